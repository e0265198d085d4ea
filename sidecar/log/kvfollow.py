"""Following a NATS KV bucket with one watch instead of listing it.

nats-py's `keys()` creates a consumer per listing: a JetStream API call, and from every
app pod's sidecar, every few seconds, that adds up. A watch is one push consumer that
delivers the current values and then each change as it happens, and costs JetStream
nothing while the bucket is quiet.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import trio
from nats.errors import TimeoutError as NatsTimeout

from sidecar.log.connection import NatsConnection
from sidecar.logs import get_logger

log = get_logger("log.kvfollow")

RETRY = 1.0  # after a watch failed (NATS away), before watching again
WAIT = 30.0  # one wait for the next update; a quiet bucket just loops


class Follower(Protocol):
    def begin(self) -> None:
        """A watch starts (again, after a failure): the bucket's current values come next."""

    def seen(self, entry: Any) -> None:
        """One entry (nats-py KeyValue.Entry: key, value, operation "PUT", "DEL" or "PURGE")."""

    def loaded(self) -> None:
        """The current values are all in; from here on, each change as it happens."""


async def follow(conn: NatsConnection, kv: Any, pattern: str, follower: Follower) -> None:
    """Feed `follower` the keys matching `pattern` for as long as this runs; rewatch when NATS fails."""
    while True:
        try:
            await _watch(conn, kv, pattern, follower)
        except Exception as exc:  # keep the last known state while NATS is away
            log.debug("kv_watch_failed", pattern=pattern, error=f"{type(exc).__name__}: {exc}")
            lost = getattr(follower, "lost", None)  # optional: a follower that reports staleness
            if lost is not None:
                lost()
        await trio.sleep(RETRY)


async def _watch(conn: NatsConnection, kv: Any, pattern: str, follower: Follower) -> None:
    bridge = conn.bridge
    watcher = await bridge.run(lambda: kv.watch(pattern))
    follower.begin()
    try:
        while True:
            try:
                entry = await bridge.run(lambda: watcher.updates(timeout=WAIT))
            except NatsTimeout:
                continue
            if entry is None:  # nats-py's mark: the current values are all in
                follower.loaded()
            else:
                follower.seen(entry)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):  # gone with the connection
            await bridge.run(watcher.stop, timeout=2.0)
