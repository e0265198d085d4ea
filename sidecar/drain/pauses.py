"""Paused targets, kept in a NATS KV bucket so a pause survives restarts of every sidecar.

Every sidecar follows the bucket with one KV watch (sidecar/log/kvfollow.py).
"""

from __future__ import annotations

from typing import Any

import trio

from sidecar.log.connection import NatsConnection
from sidecar.log.kvfollow import follow
from sidecar.logs import get_logger

log = get_logger("drain.pauses")

BUCKET = "walcar_state"


def pause_key(namespace: str, target: str) -> str:
    return f"pause.{namespace}.{target}"


class Pauses:
    def __init__(self, conn: NatsConnection) -> None:
        self.conn = conn
        self.paused: set[str] = set()
        self._changed = trio.Event()
        self._kv: Any = None
        self._loading: set[str] | None = None  # while a watch delivers the current values

    async def open(self) -> None:
        self._kv = await self.conn.key_value(BUCKET)
        await self.refresh()

    async def refresh(self) -> None:
        """Read the paused set once (at start, and after this sidecar changed it)."""
        kv = self._kv

        async def keys() -> set[str]:
            try:
                return {k for k in await kv.keys() if k.startswith("pause.")}
            except Exception:  # nats-py raises NoKeysError on an empty bucket
                return set()

        self._replace(await self.conn.bridge.run(keys))

    def _replace(self, found: set[str]) -> None:
        if found != self.paused:
            self.paused = found
            self._changed.set()
            self._changed = trio.Event()

    async def watch(self) -> None:
        await follow(self.conn, self._kv, "pause.>", self)

    def begin(self) -> None:
        self._loading = set()

    def seen(self, entry: Any) -> None:
        """Collect the current values until they are all in; after that, apply each change."""
        paused = self._loading if self._loading is not None else set(self.paused)
        if entry.operation in ("DEL", "PURGE"):
            paused.discard(entry.key)
        else:
            paused.add(entry.key)
        if self._loading is None:
            self._replace(paused)

    def loaded(self) -> None:
        if self._loading is not None:
            self._replace(self._loading)
        self._loading = None

    def is_paused(self, namespace: str, target: str) -> bool:
        return pause_key(namespace, target) in self.paused

    async def wait_resumed(self, namespace: str, target: str) -> None:
        while self.is_paused(namespace, target):
            await self._changed.wait()

    async def set(self, namespace: str, target: str, paused: bool) -> None:
        kv = self._kv
        key = pause_key(namespace, target)

        async def write() -> None:
            if paused:
                await kv.put(key, b"paused")
            else:
                await kv.purge(key)

        await self.conn.bridge.run(write)
        log.info("target_paused" if paused else "target_resumed", namespace=namespace, target=target)
        await self.refresh()
