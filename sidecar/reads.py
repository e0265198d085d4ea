"""Reads through a namespace's primary target (GET /v1/kv/{ns}/{id}).

The same adapters the drain applies with, started lazily on the first read, so a
read sees exactly the key mapping the drain writes.
"""

from __future__ import annotations

from typing import Any

import trio

from sidecar.config import Config
from sidecar.drain.targets import build_target


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
