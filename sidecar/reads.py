"""Reads through a namespace's primary target (GET /v1/kv/{ns}/{id}), this sidecar's own
un-applied writes on top (`read_items`).

The same adapters the drain applies with, started lazily on the first read, so a
read sees exactly the key mapping the drain writes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from sidecar.config import CassandraTarget, Config
from sidecar.drain.targets import build_target
from sidecar.drain.targets.base import ApplyError as ApplyError  # what a failed read raises, for the fronts

if TYPE_CHECKING:
    from sidecar.ingress import Ingress


class NoReadableTarget(LookupError):
    pass


class Readers:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._targets: dict[str, Any] = {}
        self._lock = trio.Lock()

    async def target(self, namespace: str) -> Any:
        async with self._lock:
            target = self._targets.get(namespace)
            if target is None:
                ns = self.config.namespaces[namespace]
                primary = ns.primary_target()
                target = build_target(primary, namespace, self.config) if primary is not None else None
                if target is None or not hasattr(target, "get_items"):  # a remote region, an app, a queue
                    raise NoReadableTarget(f"namespace {namespace!r} has no memcached or cassandra target to read")
                await target.start()
                self._targets[namespace] = target
            return target

    async def get_items(self, namespace: str, record: str, items: list[str] | None) -> list[tuple[str, bytes, int]]:
        target = await self.target(namespace)
        return await target.get_items(record, items)

    async def forget(self, namespace: str) -> None:
        """The namespace changed or went: the next read builds its reader from the new settings."""
        async with self._lock:
            target = self._targets.pop(namespace, None)
        if target is not None:
            await target.close()

    async def close(self) -> None:
        for target in self._targets.values():
            await target.close()
        self._targets.clear()


async def read_items(ingress: Ingress, readers: Readers, namespace: str, record: str,
                     items: list[str] | None) -> list[tuple[str, bytes, int]]:
    """GET /v1/kv/{ns}/{id}: the primary target's items with this sidecar's un-applied writes on top
    (the read-your-writes overlay, sidecar/overlay.py). When every item asked for is overlaid the
    target is not asked at all, so those reads keep working while it is down."""
    overlay = ingress.overlay(namespace)
    if overlay is None or not (overlay.entries or overlay.evictions):
        return await readers.get_items(namespace, record, items)
    ns = ingress.namespace(namespace)
    mine = overlay.items_of(record)
    if not mine:
        if overlay.evictions and ingress.applied.has_unapplied(namespace, overlay.primary, record):
            overlay.fallback_reads += 1  # evicted: wait a little for the drain, then read the target
            await ingress.applied.wait_key_applied(namespace, overlay.primary, record, float(ns.visibility_budget))
        return await readers.get_items(namespace, record, items)
    cassandra = isinstance(ns.primary_target(), CassandraTarget)
    record_slot = mine.get("")
    # Cassandra deletes a whole record with one entry (item ""): what the table holds is older.
    deleted_at = record_slot.seq if cassandra and record_slot is not None and record_slot.value is None else 0
    if cassandra and deleted_at:
        del mine[""]
    # Without `items` memcached reads the record-level value (item "") only (MemcachedTarget.get_items).
    wanted = set(items) if items else (None if cassandra else {""})
    asks_target = not deleted_at and (wanted is None or any(item not in mine for item in wanted))
    found = await readers.get_items(namespace, record, items) if asks_target else []
    out = {key: (value, expires) for key, value, expires in found if key not in mine}
    now = time.time()
    for item, entry in mine.items():
        if (wanted is None or item in wanted) and entry.seq > deleted_at and entry.live(now):
            out[item] = (entry.value, entry.expires_at)  # type: ignore[assignment]
    return [(key, value, expires) for key, (value, expires) in out.items()]
