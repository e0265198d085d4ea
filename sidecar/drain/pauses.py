"""Paused targets, kept in a NATS KV bucket so a pause survives restarts of every sidecar."""

from __future__ import annotations

from typing import Any

import trio

from sidecar.log.connection import NatsConnection
from sidecar.logs import get_logger

log = get_logger("drain.pauses")

BUCKET = "walcar_state"
POLL = 1.0


def pause_key(namespace: str, target: str) -> str:
    return f"pause.{namespace}.{target}"


class Pauses:
    def __init__(self, conn: NatsConnection) -> None:
        self.conn = conn
        self.paused: set[str] = set()
        self._changed = trio.Event()
        self._kv: Any = None

    async def open(self) -> None:
        self._kv = await self.conn.key_value(BUCKET)
        await self.refresh()

    async def refresh(self) -> None:
        kv = self._kv

        async def keys() -> set[str]:
            try:
                return {k for k in await kv.keys() if k.startswith("pause.")}
            except Exception:  # nats-py raises NoKeysError on an empty bucket
                return set()

        found = await self.conn.bridge.run(keys)
        if found != self.paused:
            self.paused = found
            self._changed.set()
            self._changed = trio.Event()

    async def watch(self) -> None:
        while True:
            await trio.sleep(POLL)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last known state while NATS is away
                log.debug("pause_refresh_failed", error=str(exc))

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
