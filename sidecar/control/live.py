"""A running sidecar's namespaces: the file's, overridden by the bucket's, followed live.

One KV watch on `walcar_namespaces` (sidecar/log/kvfollow.py) feeds every change
here; a single task applies them in order through the sidecar's `apply(name, ns)`
(provision streams, swap the namespace, reconcile the drain). Precedence is per
namespace: the bucket's document when there is a valid one, else the file's, else
none (the namespace is removed). A document that does not validate is logged and
counted and changes nothing — never half-applied. While NATS is away the last
applied namespaces stay and the data plane goes on; `stale_since` says since when.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar.config import Namespace
from sidecar.control.store import NamespaceStore, Stored
from sidecar.log.kvfollow import follow
from sidecar.logs import get_logger

log = get_logger("control")

Apply = Callable[[str, Namespace | None], Awaitable[None]]


class LiveNamespaces:
    def __init__(self, namespaces: dict[str, Namespace], store: NamespaceStore, apply: Apply) -> None:
        self.namespaces = namespaces  # the running config's dict: swapped in place by `apply`
        self.file = dict(namespaces)  # the file's namespaces: the defaults under the bucket's
        self.store = store
        self.apply = apply
        self.applied: dict[str, int] = {}  # namespace -> bucket revision in force (absent: from the file)
        self.apply_errors = 0
        self.stale_since: float | None = None
        self._bucket: dict[str, Stored] = {}
        self._loading: dict[str, Stored] | None = None
        self._dirty: set[str] = set()
        self._wake = trio.Event()

    # --- what is in force -------------------------------------------------------------

    def source(self, name: str) -> tuple[str, int]:
        """("bucket", revision) or ("file", 0)."""
        if name in self.applied:
            return "bucket", self.applied[name]
        return "file", 0

    def wanted(self, name: str) -> Namespace | None:
        stored = self._bucket.get(name)
        if stored is not None and stored.ns is not None:
            return stored.ns
        return self.file.get(name)

    def summary(self) -> dict[str, Any]:
        rows = []
        for name in sorted(self.namespaces):
            source, revision = self.source(name)
            rows.append({"namespace": name, "source": source, "revision": revision})
        stale = None
        if self.stale_since is not None:
            stale = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.stale_since))
        return {"namespaces": rows, "stale_since": stale, "apply_errors": self.apply_errors}

    # --- start: the bucket as it is, applied before anything drains or listens ---------

    async def load(self) -> None:
        for stored in await self.store.latest():
            self._note(stored)
        await self._apply_dirty()

    def reload_file(self, namespaces: dict[str, Namespace]) -> None:
        """SIGHUP: the file's namespaces again; a bucket document still wins over its namespace."""
        self._dirty |= set(self.file) | set(namespaces)
        self.file = dict(namespaces)
        self._wake.set()

    # --- the watch (kvfollow.Follower) ----------------------------------------------

    async def watch(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_connection)
            await follow(self.store.conn, self.store.kv, ">", self)

    async def _follow_connection(self) -> None:
        """Stale while NATS is away: the watch cannot tell us about changes made meanwhile."""
        conn = self.store.conn
        while True:
            if not conn.connected:
                self.lost()
            elif self.stale_since is not None:
                self.stale_since = None
                log.info("control_plane_fresh")
            await conn.wait_state_change()

    def begin(self) -> None:
        self._loading = {}

    def seen(self, entry: Any) -> None:
        stored = self.store.decode(entry.key, entry.revision, entry.value, entry.operation)
        if self._loading is not None:
            self._loading[entry.key] = stored
        else:
            self._note(stored)

    def loaded(self) -> None:
        snapshot, self._loading = self._loading or {}, None
        for name in set(self._bucket) | set(snapshot):  # a key gone while the watch was down was deleted
            self._note(snapshot.get(name) or Stored(name=name, revision=-1))
        self.stale_since = None

    def lost(self) -> None:
        if self.stale_since is None:
            self.stale_since = time.time()
            log.warning("control_plane_stale", reason="namespace bucket unreachable; the last applied config stays")

    def _note(self, stored: Stored) -> None:
        if stored.doc is not None and stored.ns is None:
            self.apply_errors += 1
            log.error("namespace_document_invalid", namespace=stored.name, revision=stored.revision,
                      error=stored.error)
            return
        before = self._bucket.get(stored.name)
        if before is not None and before.revision == stored.revision:
            return
        if stored.doc is None and before is None:
            return  # a deletion of something never seen
        if stored.doc is None:
            self._bucket.pop(stored.name, None)
        else:
            self._bucket[stored.name] = stored
        self._dirty.add(stored.name)
        self._wake.set()

    # --- applying -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._apply_dirty()

    async def _apply_dirty(self) -> None:
        while self._dirty:
            name = min(self._dirty)
            self._dirty.discard(name)
            ns = self.wanted(name)
            stored = self._bucket.get(name)
            if ns != self.namespaces.get(name):
                try:
                    await self.apply(name, ns)
                except Exception as exc:  # refused (unsafe) or failed: the namespace stays as it was
                    self.apply_errors += 1
                    log.error("namespace_apply_failed", namespace=name,
                              revision=stored.revision if stored else 0, error=f"{type(exc).__name__}: {exc}")
                    continue
            if stored is not None and stored.ns is not None:
                self.applied[name] = stored.revision
            else:
                self.applied.pop(name, None)
