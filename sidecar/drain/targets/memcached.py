"""The memcached target: journaled set/delete/touch applied with pymemcache.

pymemcache is blocking, so each round runs in worker threads (one job per server,
at most `pool_size` at a time), never on the trio loop. Memcached ops set whole
state, so a key's run collapses to its last effect before it is sent (set then
delete is a delete; set then touch is a set with the new expiry; a record's items
are keys of their own and collapse each on its own), and each server
gets its sets pipelined in one `set_many` per (flags, expiry).

Key mapping: an entry's key is the memcached key; a KV item (`item` non-empty)
is `<key>/<item>`; a binary key journaled by the memcached front as `b64:<base64>`
is decoded back to its bytes. Expiry is the absolute `expires_at` journaled at
ingress, so a late drain or replay never extends a TTL; an entry already expired
when applied removes the key instead (that is what it would have done by now).
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from dataclasses import dataclass

import trio
from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from sidecar.config import MemcachedTarget as MemcachedSettings
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome, addressed_to
from sidecar.envelope import Entry, Op
from sidecar.memcache_keys import server_for_key, target_key
from sidecar.units import parse_hostport

_APPLIED_OPS = frozenset({Op.PUT, Op.DELETE, Op.TOUCH})


def cache_key(entry: Entry) -> bytes:
    return target_key(entry.key, entry.item)


@dataclass(slots=True)
class _Effect:
    """What a run leaves behind for one key."""

    kind: str  # "set" | "delete" | "touch" | "none"
    value: bytes = b""
    flags: int = 0
    exptime: int = 0


def effects(run: list[Entry], now: float) -> list[tuple[bytes, _Effect]]:
    """A run is one record's entries (lanes are per record); each KV item of it is a memcached key of
    its own, so the run collapses per item: a put of item a then a delete of item b is both."""
    if len(run) == 1:
        return [(cache_key(run[0]), collapse(run, now))]
    by_key: dict[bytes, list[Entry]] = {}
    for entry in run:
        by_key.setdefault(cache_key(entry), []).append(entry)
    return [(key, collapse(entries, now)) for key, entries in by_key.items()]


def collapse(run: list[Entry], now: float) -> _Effect:
    first = run[0]
    if len(run) == 1 and first.op is Op.PUT and not first.expires_at:  # nearly every run in a backlog
        return _Effect("set", first.value or b"", first.flags)
    effect = _Effect("none")
    for entry in run:
        if entry.op is Op.PUT:
            effect = _Effect("set", entry.value or b"", entry.flags, entry.expires_at)
        elif entry.op is Op.DELETE:
            effect = _Effect("delete")
        elif entry.op is Op.TOUCH:
            if effect.kind == "set":
                effect.exptime = entry.expires_at
            elif effect.kind != "delete":
                effect = _Effect("touch", exptime=entry.expires_at)
    if effect.kind in ("set", "touch") and effect.exptime and effect.exptime <= now:
        return _Effect("delete")
    return effect


def classify(exc: BaseException) -> ErrorClass:
    if isinstance(exc, MemcacheIllegalInputError | MemcacheClientError):
        return ErrorClass.PERMANENT
    if isinstance(exc, MemcacheServerError):
        # "object too large for cache" will never fit; "out of memory" may pass later.
        return ErrorClass.PERMANENT if "too large" in str(exc) else ErrorClass.TRANSIENT
    if isinstance(exc, ConnectionError | socket.timeout | TimeoutError | MemcacheUnexpectedCloseError | OSError):
        return ErrorClass.UNAVAILABLE
    return ErrorClass.TRANSIENT


class _Server:
    """A small pool of pymemcache clients to one server."""

    def __init__(self, address: str, settings: MemcachedSettings) -> None:
        self.address = address
        self.host, self.port = parse_hostport(address)
        self.settings = settings
        self.idle: list[Client] = []

    def client(self) -> Client:
        if self.idle:
            return self.idle.pop()
        return Client(
            (self.host, self.port),
            connect_timeout=self.settings.timeout,
            timeout=self.settings.timeout,
            no_delay=True,
            default_noreply=False,
            allow_unicode_keys=False,
        )

    def release(self, client: Client, broken: bool) -> None:
        if broken:
            client.close()
        elif len(self.idle) < self.settings.pool_size:
            self.idle.append(client)
        else:
            client.close()


class MemcachedTarget:
    def __init__(self, settings: MemcachedSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.servers = {address: _Server(address, settings) for address in settings.servers}
        self.addresses = list(settings.servers)
        self.limiter = trio.CapacityLimiter(max(1, settings.pool_size))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for server in self.servers.values():
            while server.idle:
                server.idle.pop().close()

    def wants(self, entry: Entry) -> bool:
        return entry.op in _APPLIED_OPS and addressed_to(entry, self.name)

    def server_for(self, key: bytes) -> _Server:
        """The same choice the memcached front's reads make (routing.server_for_key)."""
        if len(self.servers) == 1:
            return next(iter(self.servers.values()))
        return self.servers[server_for_key(self.addresses, key)]

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        now = time.time()
        outcomes: list[RunOutcome] = [RunOutcome(len(run)) for run in runs]

        async def apply_on(server: _Server, work: list[tuple[int, bytes, _Effect]]) -> None:
            errors = await trio.to_thread.run_sync(self._apply_sync, server, work, limiter=self.limiter)
            for index, error in errors.items():
                outcomes[index] = RunOutcome(0, error)

        work = [(index, key, effect) for index, run in enumerate(runs) for key, effect in effects(run, now)]
        if len(self.servers) == 1:  # no routing, no task per server
            await apply_on(self.servers[self.addresses[0]], work)
            return outcomes
        by_server: dict[str, list[tuple[int, bytes, _Effect]]] = defaultdict(list)
        for item in work:
            by_server[self.server_for(item[1]).address].append(item)
        async with trio.open_nursery() as nursery:
            for address, work in by_server.items():
                nursery.start_soon(apply_on, self.servers[address], work)
        return outcomes

    def _apply_sync(self, server: _Server, work: list[tuple[int, bytes, _Effect]]) -> dict[int, ApplyError]:
        """In a worker thread: pipelined sets, then deletes and touches. Returns the failed runs."""
        client = server.client()
        broken = False
        try:
            return self._apply_with(client, work)
        except Exception as exc:  # the whole connection failed: every run of this server failed with it
            broken = True
            error = ApplyError(classify(exc), f"memcached {server.address}: {type(exc).__name__}: {exc}")
            return {index: error for index, _, _ in work}
        finally:
            server.release(client, broken)

    def _apply_with(self, client: Client, work: list[tuple[int, bytes, _Effect]]) -> dict[int, ApplyError]:
        failed: dict[int, ApplyError] = {}
        sets: dict[tuple[int, int], dict[bytes, tuple[int, bytes]]] = defaultdict(dict)
        for index, key, effect in work:
            if effect.kind == "set":
                sets[(effect.flags, effect.exptime)][key] = (index, effect.value)
        for (flags, exptime), group in sets.items():
            values = {key: value for key, (_, value) in group.items()}
            try:
                not_stored = client.set_many(values, expire=exptime, flags=flags, noreply=False)
            except (MemcacheServerError, MemcacheClientError, MemcacheIllegalInputError):
                # One bad item fails the pipelined call: find it by setting one at a time.
                client.close()
                not_stored = self._set_each(client, group, flags, exptime, failed)
            for key in not_stored:
                index = group[key][0]
                failed.setdefault(index, ApplyError(ErrorClass.TRANSIENT, f"memcached did not store {key!r}"))
        for index, key, effect in work:
            try:
                if effect.kind == "delete":
                    client.delete(key, noreply=False)
                elif effect.kind == "touch":
                    client.touch(key, expire=effect.exptime, noreply=False)
            except (MemcacheServerError, MemcacheClientError, MemcacheIllegalInputError) as exc:
                failed[index] = ApplyError(classify(exc), f"{type(exc).__name__}: {exc}")
        return failed

    @staticmethod
    def _set_each(client: Client, group: dict[bytes, tuple[int, bytes]], flags: int, exptime: int,
                  failed: dict[int, ApplyError]) -> list[bytes]:
        for key, (index, value) in group.items():
            try:
                client.set(key, value, expire=exptime, flags=flags, noreply=False)
            except (MemcacheServerError, MemcacheClientError, MemcacheIllegalInputError) as exc:
                failed[index] = ApplyError(classify(exc), f"{type(exc).__name__}: {exc}")
        return []

    async def health(self) -> None:
        def probe() -> None:
            for server in self.servers.values():
                client = server.client()
                try:
                    client.version()
                except Exception as exc:
                    client.close()
                    raise ApplyError(classify(exc), f"memcached {server.address}: {exc}") from None
                server.release(client, False)

        await trio.to_thread.run_sync(probe, limiter=self.limiter)

    async def get_items(self, record: str, items: list[str] | None = None) -> list[tuple[str, bytes, int]]:
        """(item key, value, expires_at=0) of a record; memcached cannot list a record's items, so
        without `items` this reads the record-level value (item "")."""
        wanted = items if items else [""]
        keys = {cache_key(Entry(id="", ns="", op=Op.PUT, key=record, partition=0, item=item, write_time=0)): item
                for item in wanted}

        def read() -> dict[bytes, bytes]:
            found: dict[bytes, bytes] = {}
            for key in keys:
                server = self.server_for(key)
                client = server.client()
                try:
                    value = client.get(key)
                except Exception as exc:
                    client.close()
                    raise ApplyError(classify(exc), f"memcached {server.address}: {exc}") from None
                server.release(client, False)
                if value is not None:
                    found[key] = value
            return found

        found = await trio.to_thread.run_sync(read, limiter=self.limiter)
        return [(keys[key], value, 0) for key, value in found.items()]
