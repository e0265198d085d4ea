"""What each memcached command means for walcar.

Four kinds of command (see `Kind`):

* unconditional writes (set, delete, touch, ms in set mode without C, md without C/I)
  are journaled and answered only after the journal's durable ack; memcached gets
  them later, from the drain;
* conditional writes (add, replace, append, prepend, cas, incr, decr, ma, ms in
  E/A/P/R mode or with C, md with C or I) need memcached's current value, so they run
  against memcached synchronously, and the state they leave (read back on the same
  connection, pipelined) is journaled before the client hears memcached's answer;
* reads are relayed to memcached (gat/gats and mg with T also journal the new TTL
  of every hit, since they change it);
* the rest is answered locally (version, verbosity, mn) or relayed (stats, flush_all).

Every answer is bytes ready for the client (b"" when noreply or quiet mode hides it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

import trio

from sidecar.config import MemcachedTarget, Namespace
from sidecar.envelope import Entry, Op
from sidecar.ingress import Ack, BadKey, Ingress, TooLarge
from sidecar.logs import get_logger
from sidecar.memcache_keys import EXPIRED, absolute_expiry, entry_key, new_entry_id
from sidecar.overlay import NamespaceOverlay

from . import overlaid
from .backend import Backend, BackendError
from .client_codec import ResponseKind, encode_command, strip_quiet
from .codec import (
    MN,
    OK,
    encode_client_error,
    encode_meta_response,
    encode_values,
    quiet_suppresses,
)
from .commands import (
    Command,
    Delete,
    FlushAll,
    IncrDecr,
    MetaArithmetic,
    MetaCommand,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaResponse,
    MetaSet,
    Quit,
    Response,
    Retrieve,
    Stats,
    StatsReport,
    Status,
    Store,
    Touch,
    ValueItem,
    Values,
    Verbosity,
    Version,
)
from .conditional import ConditionalOps, direct_request, relay_answer, write_resolved
from .replies import DELETED, STORED, TOUCHED, VERSION_ANSWER, server_error
from .stats import FrontStats, LogThrottle, stats_report

__all__ = ["BUSY_WAIT", "Handlers", "JournalJob", "Kind", "memcached_target"]

log = get_logger("memcached")

# How long a conditional op waits for this sidecar's earlier writes to the key to be applied
# by the drain before answering "busy"; lock waits behind other conditional ops count too.
BUSY_WAIT = 1.0


class Kind(enum.IntEnum):
    LOCAL = 0  # answered by the sidecar at once
    JOURNAL = 1  # unconditional write: journaled, answered after the durable ack
    READ = 2  # relayed to memcached; may run alongside other reads and journal writes
    SYNC = 3  # runs alone, after everything before it on the connection finished
    CLOSE = 4  # quit


def memcached_target(ns: Namespace) -> MemcachedTarget | None:
    """The target reads and conditional ops use: the primary if it is memcached, else the first memcached one."""
    primary = ns.primary_target()
    if isinstance(primary, MemcachedTarget):
        return primary
    return next((t for t in ns.targets if isinstance(t, MemcachedTarget)), None)


class JournalJob:
    """An unconditional write ready to journal, with the answer to give once it is durable."""

    __slots__ = ("answer", "entry", "hold", "noreply")

    def __init__(self, entry: Entry, answer: bytes, noreply: bool, hold: bool) -> None:
        self.entry = entry
        self.answer = answer
        self.noreply = noreply
        # True when the journal may yield before queueing the entry (chunk store): later
        # writes of the connection must then wait for this one to keep arrival order.
        self.hold = hold


_TEXT_KINDS: Final[dict[type, Kind]] = {
    Delete: Kind.JOURNAL,
    Touch: Kind.JOURNAL,
    IncrDecr: Kind.SYNC,
    MetaArithmetic: Kind.SYNC,
    MetaDebug: Kind.READ,
    MetaNoop: Kind.LOCAL,
    Version: Kind.LOCAL,
    Verbosity: Kind.LOCAL,
    Stats: Kind.SYNC,
    FlushAll: Kind.SYNC,
    Quit: Kind.CLOSE,
}


def classify(cmd: Command) -> Kind:
    kind = _TEXT_KINDS.get(type(cmd))
    if kind is not None:
        return kind
    if type(cmd) is Store:
        return Kind.JOURNAL if cmd.command == "set" else Kind.SYNC
    if type(cmd) is Retrieve:
        return Kind.SYNC if cmd.exptime is not None else Kind.READ
    if type(cmd) is MetaSet:
        return Kind.JOURNAL if cmd.store_command == "set" and "C" not in cmd.flags else Kind.SYNC
    if type(cmd) is MetaDelete:
        return Kind.SYNC if "C" in cmd.flags or "I" in cmd.flags else Kind.JOURNAL
    if type(cmd) is MetaGet:
        return Kind.SYNC if "T" in cmd.flags else Kind.READ
    raise TypeError(f"unknown command {type(cmd).__name__}")


class Handlers:
    """Command semantics for one listener (one namespace)."""

    def __init__(
        self,
        ingress: Ingress,
        namespace: str,
        backend: Backend | None,
        stats: FrontStats | None = None,
        busy_wait: float | None = None,
    ) -> None:
        self.ingress = ingress
        self.namespace = namespace
        self.ns = ingress.namespace(namespace)
        self.target = memcached_target(self.ns)
        self.backend = backend
        self.stats = stats or FrontStats()
        self.busy_wait = BUSY_WAIT if busy_wait is None else busy_wait
        self._chunk_threshold = int(self.ns.chunk_threshold)
        self._noreply_log = LogThrottle()
        self.conditional = (
            ConditionalOps(ingress, namespace, self.target.name, backend, self.stats, self.busy_wait)
            if backend is not None and self.target is not None
            else None
        )

    classify = staticmethod(classify)

    # ------------------------------------------------------------------ local

    def local(self, cmd: Command) -> bytes:
        if type(cmd) is MetaNoop:
            return MN
        if type(cmd) is Version:
            return VERSION_ANSWER
        if type(cmd) is Verbosity:
            return b"" if cmd.noreply else OK
        raise TypeError(f"{type(cmd).__name__} is not answered locally")

    # ------------------------------------------------------------------ unconditional writes

    def journal_job(self, cmd: Command) -> JournalJob | bytes:
        """The entry for an unconditional write, or the answer refusing it."""
        if type(cmd) is Store:
            expires_at = absolute_expiry(cmd.exptime)
            answer = b"" if cmd.noreply else STORED
            return self._job(cmd.key, expires_at, cmd.value, cmd.flags, answer, cmd.noreply)
        if type(cmd) is Delete:
            return self._job(cmd.key, EXPIRED, None, 0, b"" if cmd.noreply else DELETED, cmd.noreply)
        if type(cmd) is Touch:
            answer = b"" if cmd.noreply else TOUCHED
            return self._job(cmd.key, absolute_expiry(cmd.exptime), None, 0, answer, cmd.noreply, touch=True)
        if type(cmd) is MetaSet:
            answer = _meta_answer(cmd, b"HD")
            expires_at = absolute_expiry(cmd.ttl or 0)
            return self._job(cmd.key, expires_at, cmd.value, cmd.client_flags, answer, False)
        if type(cmd) is MetaDelete:
            return self._job(cmd.key, EXPIRED, None, 0, _meta_answer(cmd, b"HD"), False)
        raise TypeError(f"{type(cmd).__name__} is not an unconditional write")

    def _job(
        self, raw_key: bytes, expires_at: int, value: bytes | None, flags: int, answer: bytes, noreply: bool,
        touch: bool = False,
    ) -> JournalJob | bytes:
        """PUT (value given), TOUCH, or DELETE (delete, or an expiry already in the past)."""
        if expires_at == EXPIRED:
            op, value, flags, expires_at = Op.DELETE, None, 0, 0
        elif touch:
            op = Op.TOUCH
        else:
            op = Op.PUT
        try:
            entry = self.ingress.entry(self.namespace, op, entry_key(raw_key), value=value, flags=flags,
                                       expires_at=expires_at, entry_id=new_entry_id())
        except TooLarge:
            return b"" if noreply else server_error("object too large for cache")
        except BadKey:  # a binary (meta `b`) key memcached's text protocol cannot carry
            return b"" if noreply else encode_client_error("bad command line format")
        hold = value is not None and len(value) > self._chunk_threshold
        return JournalJob(entry, answer, noreply, hold)

    # ------------------------------------------------------------------ the WAL switched off

    def wal_off(self) -> bool:
        return self.backend is not None and self.target is not None and self.ingress.wal_off(self.namespace)

    async def direct(self, cmd: Command) -> bool:
        """An unconditional write that goes straight to memcached: `mode = "off"`, and its key clear of
        what this sidecar journaled earlier (waited for, like a conditional op: Ingress.direct)."""
        assert self.target is not None
        key = entry_key(cmd.key)  # type: ignore[union-attr]  # classify() sends only keyed writes here
        return await self.ingress.direct(self.namespace, self.target.name, (key,), self.busy_wait)

    async def forward(self, cmd: Command) -> bytes:
        """memcached's own answer to the write (no journal, no durable claim: the WAL is off)."""
        try:
            raw_key, request, kind = direct_request(cmd)
            backend = self._backend()
            (response,) = await backend.request(backend.server_for(raw_key), request, (kind,))
        except BackendError as exc:
            self.stats.backend_errors += 1
            return b"" if getattr(cmd, "noreply", False) else server_error(str(exc))
        self.stats.writes_direct += 1
        return relay_answer(cmd, response, bool(getattr(cmd, "noreply", False)))

    async def journal(self, job: JournalJob) -> bytes:
        """Journal an unconditional write; its answer only with a durable ack."""
        try:
            ack = await self.ingress.write(job.entry, "memcached", packable=True)
        except Exception as exc:  # a bug must not leave the client without an answer
            log.error("journal_write_bug", key=job.entry.key, exc_info=True)
            return self.journal_answer(job, None, f"journal write failed: {type(exc).__name__}: {exc}")
        return self.journal_answer(job, ack)

    def journal_answer(self, job: JournalJob, ack: Ack | None, reason: str = "") -> bytes:
        """The client's answer to a journaled write: the job's own only with a durable ack."""
        ack_ok = ack is not None and ack.ok
        if ack is not None and not ack_ok:
            reason = f"not journaled (durable={ack.durable}): {ack.message or 'no reason given'}"
        if ack_ok:
            self.stats.writes_stored += 1
            return job.answer
        self.stats.writes_failed += 1
        if job.noreply:
            self.stats.noreply_failed += 1
            if self._noreply_log.allow():
                log.warning("noreply_write_failed", key=job.entry.key, op=str(job.entry.op), reason=reason,
                            suppressed=self._noreply_log.take_suppressed())
            return b""
        return server_error(reason)

    # ------------------------------------------------------------------ reads

    async def read(self, cmd: Command) -> bytes:
        try:
            if type(cmd) is Retrieve:
                return await self._retrieve(cmd)
            if type(cmd) is MetaGet:
                return await self._meta_get(cmd)
            if type(cmd) is MetaDebug:
                return await self._relay_one(cmd.key, encode_command(cmd), ResponseKind.META)
        except BackendError as exc:
            self.stats.backend_errors += 1
            return server_error(str(exc))
        raise TypeError(f"{type(cmd).__name__} is not a read")

    def _backend(self) -> Backend:
        if self.backend is None:
            raise BackendError(f"namespace {self.namespace} has no memcached target")
        return self.backend

    async def _relay_one(self, raw_key: bytes, payload: bytes, kind: ResponseKind) -> bytes:
        backend = self._backend()
        (response,) = await backend.request(backend.server_for(raw_key), payload, (kind,))
        return _raw(response)

    def reads_own_writes(self) -> bool:
        return self.target is not None and self.ingress.namespace(self.namespace).read_your_writes

    def _overlay(self) -> NamespaceOverlay | None:
        """The read-your-writes overlay to consult, if any (settings read at use: they change live)."""
        if self.target is None:
            return None
        overlay = self.ingress.overlay(self.namespace)
        if not overlaid.consulted(overlay) or overlay.primary != self.target.name:  # type: ignore[union-attr]
            return None
        return overlay

    async def _retrieve(self, cmd: Retrieve) -> bytes:
        overlay = self._overlay()
        answered = await overlaid.retrieve(self.ingress, self.namespace, overlay, cmd.keys, cmd.return_cas) \
            if overlay is not None else None
        if answered:
            rest = [key for key in cmd.keys if key not in answered]
            fetched: dict[bytes, ValueItem] = {}
            if rest:
                got = await self._fetch(Retrieve(cmd.command, rest, cmd.exptime))
                if isinstance(got, bytes):
                    return got
                fetched = {item.key: item for item in got[0]}
            items = [item for key in cmd.keys
                     if (item := answered[key] if key in answered else fetched.get(key)) is not None]
            answer = encode_values(items, with_cas=cmd.return_cas)
        else:
            got = await self._fetch(cmd)
            if isinstance(got, bytes):
                return got
            items, answer = got
        if cmd.exptime is not None and items:
            problem = await self._journal_touches([item.key for item in items], cmd.exptime)
            if problem is not None:
                return problem
        return answer

    async def _fetch(self, cmd: Retrieve) -> tuple[list[ValueItem], bytes] | bytes:
        """memcached's hits and its whole answer, or its error answer (bytes)."""
        backend = self._backend()
        by_server: dict[str, list[bytes]] = {}
        for key in cmd.keys:
            by_server.setdefault(backend.server_for(key), []).append(key)
        if len(by_server) == 1:
            (server,) = by_server
            (response,) = await backend.request(server, encode_command(cmd), (ResponseKind.VALUES,))
            if type(response) is not Values:
                return _raw(response)
            return response.items, response.raw
        answers = await self._fan_out(cmd, by_server)
        failed = next((r for r in answers.values() if type(r) is not Values), None)
        if failed is not None:
            return _raw(failed)
        items = _merge(cmd.keys, backend, answers)  # type: ignore[arg-type]
        return items, encode_values(items, with_cas=cmd.return_cas)

    async def _fan_out(self, cmd: Retrieve, by_server: dict[str, list[bytes]]) -> dict[str, Response]:
        """One retrieval per server, concurrently."""
        backend = self._backend()
        answers: dict[str, Response] = {}
        errors: list[BackendError] = []

        async def one(server: str, keys: list[bytes]) -> None:
            part = Retrieve(cmd.command, keys, cmd.exptime)
            try:
                (answers[server],) = await backend.request(server, encode_command(part), (ResponseKind.VALUES,))
            except BackendError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for server, keys in by_server.items():
                nursery.start_soon(one, server, keys)
        if errors:
            raise errors[0]
        return answers

    async def _meta_get(self, cmd: MetaGet) -> bytes:
        overlay = self._overlay()
        if overlay is not None:
            answer = await overlaid.meta_get(self.ingress, self.namespace, overlay, cmd)
            if answer is not None:
                return answer
        backend = self._backend()
        forwarded = strip_quiet(cmd)
        (response,) = await backend.request(backend.server_for(cmd.key), encode_command(forwarded),
                                            (ResponseKind.META,))
        if type(response) is MetaResponse:
            if "T" in cmd.flags and response.code in (b"VA", b"HD"):
                problem = await self._journal_touches([cmd.key], cmd.ttl or 0)
                if problem is not None:
                    return problem
            if "q" in cmd.flags and quiet_suppresses("mg", response.code):
                return b""
        return _raw(response)

    async def _journal_touches(self, raw_keys: Iterable[bytes], exptime: int) -> bytes | None:
        """gat/gats/mg T changed the TTL of these hits in memcached: journal it, so replicas follow."""
        expires_at = absolute_expiry(exptime)
        entries = []
        for raw_key in dict.fromkeys(raw_keys):
            if expires_at == EXPIRED:
                entries.append(self.ingress.entry(self.namespace, Op.DELETE, entry_key(raw_key),
                                                  entry_id=new_entry_id()))
            else:
                entries.append(self.ingress.entry(self.namespace, Op.TOUCH, entry_key(raw_key),
                                                  expires_at=expires_at, entry_id=new_entry_id()))
        failures: list[str] = []

        async def write(entry: Entry) -> None:
            reason = await write_resolved(self.ingress, entry)
            if reason is not None:
                failures.append(reason)

        async with trio.open_nursery() as nursery:
            for entry in entries:
                nursery.start_soon(write, entry)
        if failures:
            self.stats.conditional_unjournaled += 1
            return server_error(f"applied to memcached but not journaled: {failures[0]}")
        return None

    # ------------------------------------------------------------------ synchronous commands

    async def sync(self, cmd: Command) -> bytes:
        try:
            if type(cmd) is Stats:
                return await self._stats(cmd)
            if type(cmd) is FlushAll:
                return await self._flush_all(cmd)
            if type(cmd) is Retrieve or type(cmd) is MetaGet:
                return await self.read(cmd)
            if self.conditional is None:
                raise BackendError(f"namespace {self.namespace} has no memcached target")
            return await self.conditional.run(cmd)
        except BackendError as exc:
            self.stats.backend_errors += 1
            if getattr(cmd, "noreply", False):
                if self._noreply_log.allow():
                    log.warning("noreply_command_failed", command=type(cmd).__name__, reason=str(exc),
                                suppressed=self._noreply_log.take_suppressed())
                return b""
            return server_error(str(exc))

    async def _stats(self, cmd: Stats) -> bytes:
        journal = self.ingress.journal.writer.stats
        if self.backend is None:
            return stats_report([], self.stats, journal, False)
        try:
            (response,) = await self.backend.request(self.backend.servers[0], encode_command(cmd),
                                                     (ResponseKind.STATS,))
        except BackendError:
            if cmd.args:
                raise
            self.stats.backend_errors += 1
            return stats_report([], self.stats, journal, False)
        if type(response) is StatsReport and not cmd.args:
            return stats_report(response.stats, self.stats, journal, True)
        return _raw(response)

    async def _flush_all(self, cmd: FlushAll) -> bytes:
        """Forwarded to every server, never journaled (see docs/memcached.md)."""
        if self.backend is None:
            return b"" if cmd.noreply else OK
        backend = self.backend
        forwarded = FlushAll(cmd.delay, False)
        answers: list[Response] = []
        errors: list[BackendError] = []

        async def one(server: str) -> None:
            try:
                answers.extend(await backend.request(server, encode_command(forwarded), (ResponseKind.OK,)))
            except BackendError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for server in backend.servers:
                nursery.start_soon(one, server)
        log.info("flush_all_forwarded", namespace=self.namespace, delay=cmd.delay, servers=len(backend.servers),
                 failed=len(errors))
        if errors:
            raise errors[0]
        failed = next((a for a in answers if not (type(a) is Status and a.code == b"OK")), None)
        if cmd.noreply:
            return b""
        return OK if failed is None else _raw(failed)

# --------------------------------------------------------------------------- helpers


def _meta_answer(cmd: MetaCommand, code: bytes) -> bytes:
    return encode_meta_response(cmd, code)


def _raw(response: Response) -> bytes:
    return response.raw


def _merge(keys: list[bytes], backend: Backend, answers: dict[str, Values]) -> list[ValueItem]:
    """Hits of a multi-server get in request order (each server answers its keys in order)."""
    queues = {server: list(reversed(values.items)) for server, values in answers.items()}
    merged: list[ValueItem] = []
    for key in keys:
        queue = queues[backend.server_for(key)]
        if queue and queue[-1].key == key:
            merged.append(queue.pop())
    return merged
