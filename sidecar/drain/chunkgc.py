"""Delete a chunked payload once every target that needed it has applied its entry.

Each target's drainer adds itself to the object's record in a KV bucket (compare
and set, so concurrent drainers never lose an update); the one that completes the
set deletes the object and the record. Objects nobody finishes expire with the
chunk bucket's max age (the namespace's replay window).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from sidecar.log.chunks import ChunkStore
from sidecar.log.connection import NatsConnection
from sidecar.logs import get_logger

log = get_logger("drain.chunkgc")

BUCKET = "walcar_chunkrefs"


class ChunkCollector:
    def __init__(self, conn: NatsConnection, chunks: ChunkStore, ttl: float) -> None:
        self.conn = conn
        self.chunks = chunks
        self.ttl = ttl
        self._kv: Any = None

    async def open(self) -> None:
        self._kv = await self.conn.key_value(BUCKET, self.ttl)

    async def applied(self, namespace: str, obj: str, target: str, needed: set[str]) -> bool:
        """Record that `target` applied the entry of `obj`; True when this call deleted it."""
        kv = self._kv
        key = f"chunk.{namespace}.{hashlib.sha1(obj.encode()).hexdigest()}"

        async def record() -> bool:
            from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

            for _ in range(20):
                try:
                    entry = await kv.get(key)
                    done = set(msgspec.msgpack.decode(entry.value or b"\x90"))
                    revision = entry.revision
                except KeyNotFoundError:
                    done, revision = set(), None
                done.add(target)
                value = msgspec.msgpack.encode(sorted(done))
                try:
                    if revision is None:
                        await kv.create(key, value)
                    else:
                        await kv.update(key, value, last=revision)
                except KeyWrongLastSequenceError:
                    continue  # another drainer got there first: read again
                return needed <= done
            return False

        complete = await self.conn.bridge.run(record)
        if complete:
            await self.chunks.delete(namespace, obj)
            await self.conn.bridge.run(lambda: kv.purge(key))
            log.debug("chunk_deleted", namespace=namespace, object=obj)
        return complete
