"""Paused targets, kept in a NATS KV bucket so a pause survives restarts of every sidecar.

Every sidecar follows the bucket with one KV watch (sidecar/log/kvfollow.py).
"""

from __future__ import annotations

from typing import Any

import trio

from sidecar.log.connection import NatsConnection
from sidecar.log.kvfollow import follow
from sidecar.log.kvread import kv_latest
from sidecar.logs import get_logger

log = get_logger("drain.pauses")

BUCKET = "walcar_state"
REFRESH_TRIES = 5


def pause_key(namespace: str, target: str) -> str:
    return f"pause.{namespace}.{target}"


class Pauses:
    def __init__(self, conn: NatsConnection) -> None:
        self.conn = conn
        self.paused: set[str] = set()
        self._changed = trio.Event()
        self._kv: Any = None
        self._loading: set[str] | None = None  # while a watch delivers the current values
        self._confirm = trio.Event()  # set when a watch's first values need a listing to confirm them

    async def open(self) -> None:
        self._kv = await self.conn.key_value(BUCKET)
        await self.refresh()

    async def refresh(self) -> None:
        """Read the paused set (at start, after this sidecar changed it, and to confirm a watch's first
        values). From the bucket's stream, each pause key's last message: nats-py's `keys()` and a
        watch's first values both miss a present key now and then (1-2 in 300 listings on an idle
        server: tests/integration/test_pauses.py), and a sidecar just started would then drain a paused target.
        A listing that fails is tried again; after REFRESH_TRIES the error is raised, never taken
        for "nothing is paused"."""
        for attempt in range(1, REFRESH_TRIES + 1):
            try:
                found = {record.key for record in await kv_latest(self.conn, BUCKET, "pause.>")}
                break
            except Exception as exc:
                if attempt == REFRESH_TRIES:
                    raise
                log.warning("pauses_read_failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.5 * attempt)
        self._replace(found)

    def _replace(self, found: set[str]) -> None:
        if found != self.paused:
            self.paused = found
            self._changed.set()
            self._changed = trio.Event()

    async def watch(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._confirm_loop)
            await follow(self.conn, self._kv, "pause.>", self)

    async def _confirm_loop(self) -> None:
        """A watch's first values that differ from what is known are confirmed by a listing."""
        while True:
            await self._confirm.wait()
            self._confirm = trio.Event()
            try:
                await self.refresh()
            except Exception as exc:  # NATS away: the watch's next start asks again
                log.warning("pauses_confirm_failed", error=f"{type(exc).__name__}: {exc}")

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
        """A watch's first values are in. They may lack a key that is there (nats-py), so a pause is not
        lifted on their word: what they add is taken at once, what they drop only once a listing says so."""
        found, self._loading = self._loading, None
        if found is not None and found != self.paused:
            self._replace(found | self.paused)
            self._confirm.set()

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
