"""Partition ownership: leases in a NATS KV bucket whose entries expire after the lease TTL.

Why leases and not JetStream priority groups (pinned client): pinning hands a
partition to a new client when the old one goes quiet, but the old owner's
unacked messages come back only after their AckWait — after newer ones were
already delivered to the new owner — so per-key order would break on every
failover. A lease tells the new owner exactly when it owns the partition, and it
then resets the consumer to the ack floor before applying anything
(see consumer.py).

A lease is created with KV `create` (fails if someone holds it), renewed with
`update` against its last revision (fails if it was lost), and expires with the
bucket's max age when its owner dies. Drainers also heartbeat a
`members.<namespace>.<target>.<id>` key per target they drain, so each can take a
fair share of that target's partitions and hand back the rest.

Who holds what and who drains is followed with one KV watch (LeaseView), not by listing
the bucket every round: a listing is a JetStream API call, and by default every app pod's
sidecar drains. Knowing which leases are taken also spares a `create` bound to fail (and
nats-py's follow-up read) for each partition another drainer holds.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from sidecar.log.connection import NatsConnection
from sidecar.log.kvfollow import follow
from sidecar.logs import get_logger

log = get_logger("drain.lease")

BUCKET = "walcar_leases"


def bucket_name(ttl: float) -> str:
    """A KV bucket's max age is fixed at creation, so the TTL is part of its name."""
    return f"{BUCKET}_{int(ttl * 1000)}ms"


class Leases:
    def __init__(self, conn: NatsConnection, owner: str, ttl: float) -> None:
        self.conn = conn
        self.owner = owner
        self.ttl = ttl
        self._kv: Any = None  # nats-py KeyValue (NATS thread only)
        self.bucket = bucket_name(ttl)
        self.view = LeaseView(ttl)

    async def open(self) -> None:
        self._kv = await self.conn.key_value(self.bucket, self.ttl)

    async def acquire(self, key: str) -> int | None:
        """The revision of a fresh lease on `key`, or None when another drainer holds it."""
        kv = self._kv

        async def create() -> int | None:
            from nats.js.errors import KeyWrongLastSequenceError

            try:
                return await kv.create(key, self.owner.encode())
            except KeyWrongLastSequenceError:
                return None

        return await self.conn.bridge.run(create)

    async def renew(self, key: str, revision: int) -> int | None:
        """The new revision, or None when the lease was lost (expired and taken, or deleted)."""
        kv = self._kv

        async def update() -> int | None:
            from nats.js.errors import KeyWrongLastSequenceError

            try:
                return await kv.update(key, self.owner.encode(), last=revision)
            except KeyWrongLastSequenceError:
                return None

        return await self.conn.bridge.run(update)

    async def release(self, key: str, revision: int) -> None:
        kv = self._kv

        async def delete() -> None:
            try:
                await kv.delete(key, last=revision)
            except Exception as exc:  # lost already: nothing to release
                log.debug("lease_release_failed", key=key, error=str(exc))

        await self.conn.bridge.run(delete)

    async def heartbeat(self, groups: list[str]) -> None:
        """Announce this drainer in each group (a namespace/target) it drains."""
        kv = self._kv

        async def put() -> None:
            for group in groups:
                await kv.put(f"members.{group}.{self.owner}", b"alive")

        await self.conn.bridge.run(put)

    async def leave(self, groups: list[str]) -> None:
        """On a clean stop: drop out of the member lists at once, so the others take full shares now."""
        kv = self._kv

        async def purge() -> None:
            for group in groups:
                await kv.purge(f"members.{group}.{self.owner}")

        await self.conn.bridge.run(purge)

    async def follow(self) -> None:
        """Keep `view` current for as long as the drain runs."""
        await follow(self.conn, self._kv, ">", self.view)


class LeaseView:
    """The lease bucket as seen through a watch: which leases and members are alive.

    Leases are renewed and members heartbeat every third of the TTL, so a key not put for a
    whole TTL belongs to a drainer that died: the bucket's max age removes it on the server,
    silently (a watch sees no marker for it), and this view forgets it after the same time.
    A released lease or a drainer's clean leave arrives as a delete and counts at once.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.ready = trio.Event()  # the bucket's current values are in
        self._put_at: dict[str, float] = {}  # key -> when its last put was seen (monotonic)

    def begin(self) -> None:
        """A rewatch keeps what it knew: its keys come again, and any it misses age out."""

    def seen(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE"):
            self._put_at.pop(entry.key, None)
        else:
            self._put_at[entry.key] = time.monotonic()

    def loaded(self) -> None:
        self.ready.set()

    def _alive(self) -> list[str]:
        horizon = time.monotonic() - self.ttl
        for key in [k for k, at in self._put_at.items() if at < horizon]:
            del self._put_at[key]
        return list(self._put_at)

    def drainers(self, group: str, owner: str) -> int:
        """Live drainers of `group` (a namespace/target), counting `owner` even before the watch
        brings back its first heartbeat (drainers of other groups do not shrink this one's share)."""
        prefix = f"members.{group}."
        alive = [key for key in self._alive() if key.startswith(prefix) and "." not in key[len(prefix):]]
        return len(alive) + (f"{prefix}{owner}" not in alive)

    def taken(self) -> set[str]:
        """Lease keys some drainer holds (this one's included)."""
        return {key for key in self._alive() if key.startswith("lease.")}


def lease_key(namespace: str, target: str, partition: int) -> str:
    return f"lease.{namespace}.{target}.{partition}"


def group_name(namespace: str, target: str) -> str:
    return f"{namespace}.{target}"
