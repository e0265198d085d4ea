"""Paused targets, kept in a NATS KV bucket so a pause survives restarts of every sidecar.

Every sidecar follows the bucket with one KV watch (a push consumer: updates arrive as
they happen, and an idle watch costs JetStream nothing). Listing the keys instead would
create a consumer per listing — a few API calls a second from every app pod's sidecar.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio
from nats.errors import TimeoutError as NatsTimeout

from sidecar.log.connection import NatsConnection
from sidecar.logs import get_logger

log = get_logger("drain.pauses")

BUCKET = "walcar_state"
RETRY = 1.0  # after a watch failed (NATS away), before watching again
WAIT = 30.0  # one wait for the next update; a quiet bucket just loops


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
        while True:
            try:
                await self._follow()
            except Exception as exc:  # keep the last known state while NATS is away
                log.debug("pause_watch_failed", error=f"{type(exc).__name__}: {exc}")
            await trio.sleep(RETRY)

    async def _follow(self) -> None:
        """Apply the bucket's pause keys as they change: first its current ones, then each update."""
        bridge = self.conn.bridge
        watcher = await bridge.run(lambda: self._kv.watch("pause.>"))
        try:
            current: set[str] = set()
            initial = True
            while True:
                try:
                    entry = await bridge.run(lambda: watcher.updates(timeout=WAIT))
                except NatsTimeout:
                    continue
                if entry is None:  # the current values are all in: from here on, single updates
                    initial = False
                elif entry.operation in ("DEL", "PURGE"):
                    current.discard(entry.key)
                else:
                    current.add(entry.key)
                if not initial:
                    self._replace(set(current))
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):  # gone with the connection
                await bridge.run(watcher.stop, timeout=2.0)

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
