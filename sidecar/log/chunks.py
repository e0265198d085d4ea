"""The chunk store: payloads above a namespace's chunk threshold, in a JetStream object store.

A chunked payload is written completely (every chunk acked, then its metadata)
before the marker entry that points at it is journaled, so a marker never refers to
a partial object; the object's name carries the payload's digest, so no later write
replaces it. Reads check the SHA-256 recorded in the marker. The drain deletes
an object once every target that needed it has applied the marker's entry.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sidecar.envelope import ChunkRef
from sidecar.log.connection import NatsConnection
from sidecar.log.streams import chunk_bucket
from sidecar.offload import OFF_LOOP_BYTES, off_loop

CHUNK_SIZE = 128 * 1024


class ChunkError(RuntimeError):
    pass


async def sha256_hex(data: bytes) -> str:
    if len(data) < OFF_LOOP_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await off_loop(lambda: hashlib.sha256(data).hexdigest())


class ChunkStore:
    def __init__(self, conn: NatsConnection, timeout: float = 30.0) -> None:
        self.conn = conn
        self.timeout = timeout
        self._stores: dict[str, Any] = {}  # namespace -> nats-py ObjectStore (NATS thread only)

    async def _store(self, namespace: str) -> Any:
        store = self._stores.get(namespace)
        if store is None:
            nc = self.conn.nc
            assert nc is not None
            store = await nc.jetstream().object_store(chunk_bucket(namespace))
            self._stores[namespace] = store
        return store

    async def put(self, namespace: str, name: str, data: bytes) -> ChunkRef:
        """Store `data` under `name` and its digest: a write that reuses an idempotency token with
        other content must not overwrite the object a stored marker points at (it would read back
        as corrupt); the same content under the same token lands on the same object."""
        digest = await sha256_hex(data)
        name = f"{name}.{digest[:16]}"

        async def put() -> int:
            from nats.js.api import ObjectMeta, ObjectMetaOptions

            store = await self._store(namespace)
            meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_SIZE))
            info = await store.put(name, data, meta=meta)
            return int(info.chunks or 0)

        try:
            chunks = await self.conn.bridge.run(put, timeout=self.timeout)
        except Exception as exc:
            raise ChunkError(f"chunk store write of {name} failed: {type(exc).__name__}: {exc}") from None
        return ChunkRef(object=name, size=len(data), chunks=chunks, digest=f"sha256={digest}")

    async def get(self, namespace: str, ref: ChunkRef) -> bytes:
        async def get() -> bytes:
            store = await self._store(namespace)
            result = await store.get(ref.object)
            return bytes(result.data or b"")

        try:
            data = await self.conn.bridge.run(get, timeout=self.timeout)
        except Exception as exc:
            raise ChunkError(f"chunk store read of {ref.object} failed: {type(exc).__name__}: {exc}") from None
        actual = f"sha256={await sha256_hex(data)}"
        if len(data) != ref.size or actual != ref.digest:
            raise ChunkError(
                f"chunk object {ref.object} is corrupt: expected {ref.size} bytes {ref.digest}, "
                f"got {len(data)} bytes {actual}"
            )
        return data

    async def delete(self, namespace: str, name: str) -> None:
        async def delete() -> None:
            from nats.js.errors import ObjectNotFoundError

            store = await self._store(namespace)
            try:
                await store.delete(name)
            except ObjectNotFoundError:
                pass

        await self.conn.bridge.run(delete, timeout=self.timeout)

    async def exists(self, namespace: str, name: str) -> bool:
        async def info() -> bool:
            from nats.js.errors import ObjectDeletedError, ObjectNotFoundError

            store = await self._store(namespace)
            try:
                await store.get_info(name)
            except (ObjectNotFoundError, ObjectDeletedError):
                return False
            return True

        return await self.conn.bridge.run(info, timeout=self.timeout)
