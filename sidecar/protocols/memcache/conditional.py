"""Conditional writes: computed by memcached, then journaled.

add, replace, append, prepend, cas, incr, decr, ma, ms in E/A/P/R mode or with C,
md with C or I need the item's current value, so the journal cannot answer them.
Each one (see docs/memcached.md):

1. waits (bounded) until this sidecar's earlier journaled writes of the key are
   applied by the drain — else it would compute on a value the drain is about to
   overwrite — and answers "busy" if they are not; ops on one key are serialised;
2. runs on memcached, with a pipelined `mg <key> v f t` reading back what it left;
3. if it changed the item, journals that state (a put, or a delete if it is gone),
   so replicas and replays converge;
4. answers memcached's own reply once that journal write is durable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from sidecar.envelope import Entry, Op
from sidecar.ingress import Ingress, Refused
from sidecar.logs import get_logger
from sidecar.memcache_keys import entry_key, new_entry_id, ttl_to_expiry

from .backend import Backend
from .client_codec import ResponseKind, encode_command, encode_meta, encode_store, strip_quiet
from .codec import quiet_suppresses
from .commands import (
    Command,
    Delete,
    IncrDecr,
    MetaArithmetic,
    MetaCommand,
    MetaDelete,
    MetaResponse,
    MetaSet,
    Number,
    Response,
    Status,
    Store,
    Touch,
)
from .replies import BUSY_MESSAGE, server_error
from .stats import FrontStats, LogThrottle

__all__ = ["ConditionalOps", "direct_request", "relay_answer", "write_resolved"]

log = get_logger("memcached")

class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0


class ConditionalOps:
    """Conditional writes of one listener against its memcached target."""

    def __init__(
        self, ingress: Ingress, namespace: str, target_name: str, backend: Backend, stats: FrontStats,
        busy_wait: float,
    ) -> None:
        self.ingress = ingress
        self.namespace = namespace
        self.target_name = target_name
        self.backend = backend
        self.stats = stats
        self.busy_wait = busy_wait
        self._locks: dict[str, _KeyLock] = {}
        self._log = LogThrottle()

    async def run(self, cmd: Command) -> bytes:
        """Run one conditional op; BackendError when memcached fails."""
        raw_key, forward, kind, readback = _forwarding(cmd)
        noreply = getattr(cmd, "noreply", False)
        key = entry_key(raw_key)
        deadline = trio.current_time() + self.busy_wait
        async with self._key_lock(key, deadline) as acquired:
            if not acquired or not await self._wait_applied(key, deadline):
                return self._busy(cmd, key, noreply)
            kinds = (kind, ResponseKind.META) if readback else (kind,)
            responses = await self.backend.request(self.backend.server_for(raw_key), forward + readback, kinds)
            result = responses[0]
            if _changed(result):
                problem = await self._journal_resolved(key, responses[1] if readback else None)
                if problem is not None:
                    self.stats.conditional_unjournaled += 1
                    if self._log.allow():
                        log.error("conditional_not_journaled", key=key, command=type(cmd).__name__, reason=problem,
                                  suppressed=self._log.take_suppressed())
                    return b"" if noreply else server_error(f"applied to memcached but not journaled: {problem}")
                self.stats.conditional_applied += 1
            return relay_answer(cmd, result, noreply)

    @asynccontextmanager
    async def _key_lock(self, key: str, deadline: float) -> AsyncIterator[bool]:
        """Conditional ops on one key run one at a time (op through journal ack), so their
        journaled results are in the order memcached applied them. Yields False on timeout."""
        slot = self._locks.get(key)
        if slot is None:
            slot = self._locks[key] = _KeyLock()
        slot.users += 1
        try:
            acquired = False
            with trio.move_on_at(deadline):
                await slot.lock.acquire()
                acquired = True
            try:
                yield acquired
            finally:
                if acquired:
                    slot.lock.release()
        finally:
            slot.users -= 1
            if not slot.users:
                del self._locks[key]

    def _busy(self, cmd: Command, key: str, noreply: bool) -> bytes:
        self.stats.busy += 1
        if self._log.allow():
            log.info("conditional_busy", key=key, command=type(cmd).__name__, suppressed=self._log.take_suppressed())
        return b"" if noreply else server_error(BUSY_MESSAGE)

    async def _wait_applied(self, key: str, deadline: float) -> bool:
        """Earlier journaled writes of this sidecar to the key must be in memcached before computing on it."""
        assert self.target_name
        applied = self.ingress.applied
        if not applied.has_unapplied(self.namespace, self.target_name, key):
            return True
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return False
        return await applied.wait_key_applied(self.namespace, self.target_name, key, remaining)

    async def _journal_resolved(self, key: str, state: Response | None) -> str | None:
        """Journal what the op left in memcached; the reason it failed, or None."""
        if state is None:  # md with C or I: the item is gone (or stale, which a replica treats as gone)
            entry = self.ingress.entry(self.namespace, Op.DELETE, key, entry_id=new_entry_id())
        elif type(state) is MetaResponse and state.code == b"VA":
            try:
                entry = self.ingress.entry(
                    self.namespace, Op.PUT, key, value=state.value, flags=state.client_flags or 0,
                    expires_at=ttl_to_expiry(state.ttl if state.ttl is not None else -1), entry_id=new_entry_id(),
                )
            except Refused as exc:
                return str(exc)
        elif type(state) is MetaResponse and state.code == b"EN":
            entry = self.ingress.entry(self.namespace, Op.DELETE, key, entry_id=new_entry_id())
        else:
            return f"could not read the new value back: {state.raw.strip().decode(errors='replace')}"
        return await write_resolved(self.ingress, entry)


async def write_resolved(ingress: Ingress, entry: Entry) -> str | None:
    """Journal the state an op left in memcached; the reason it is not durable, or None."""
    try:
        ack = await ingress.write(entry, "memcached", packable=True)
    except Exception as exc:  # a bug must not leave the client without an answer
        log.error("journal_write_bug", key=entry.key, exc_info=True)
        return f"{type(exc).__name__}: {exc}"
    if ack.ok:
        return None
    return f"durable={ack.durable}: {ack.message or 'no reason given'}"


# --------------------------------------------------------------------------- helpers


def _forwarding(cmd: Command) -> tuple[bytes, bytes, ResponseKind, bytes]:
    """(raw key, request for memcached, its answer kind, read-back request or b"")."""
    if type(cmd) is Store:
        forward = encode_store(cmd.command, cmd.key, cmd.value, flags=cmd.flags, exptime=cmd.exptime, cas=cmd.cas)
        return cmd.key, forward, ResponseKind.STORE, _readback(cmd.key, False)
    if type(cmd) is IncrDecr:
        forward = b"%b %b %d\r\n" % (cmd.command.encode(), cmd.key, cmd.delta)
        return cmd.key, forward, ResponseKind.ARITH, _readback(cmd.key, False)
    if type(cmd) is MetaSet or type(cmd) is MetaArithmetic:
        forward = encode_command(strip_quiet(cmd))
        return cmd.key, forward, ResponseKind.META, _readback(cmd.key, cmd.base64)
    if type(cmd) is MetaDelete:
        return cmd.key, encode_command(strip_quiet(cmd)), ResponseKind.META, b""
    raise TypeError(f"{type(cmd).__name__} is not a conditional write")


def _readback(raw_key: bytes, base64: bool) -> bytes:
    """`mg <key> v f t`: value, client flags and remaining TTL, right after the op on the same connection."""
    flags = {"b": b"", "v": b"", "f": b"", "t": b""} if base64 else {"v": b"", "f": b"", "t": b""}
    return encode_meta("mg", raw_key, flags)


def _changed(result: Response) -> bool:
    """Did memcached apply the op (so there is a new state to journal)?"""
    if type(result) is Number:
        return True
    if type(result) is Status:
        return result.code == b"STORED"
    if type(result) is MetaResponse:
        return result.code in (b"HD", b"VA")
    return False


def relay_answer(cmd: Command, result: Response, noreply: bool) -> bytes:
    """memcached's own answer, unless noreply or quiet mode hides it."""
    if noreply:
        return b""
    quiet = isinstance(cmd, MetaCommand) and "q" in cmd.flags
    if quiet and type(result) is MetaResponse and quiet_suppresses(cmd.COMMAND, result.code):  # type: ignore[union-attr]
        return b""
    return result.raw


def direct_request(cmd: Command) -> tuple[bytes, bytes, ResponseKind]:
    """(raw key, request for memcached, its answer kind) of an unconditional write, sent as is
    (noreply and quiet stripped: the relay decides what the client hears)."""
    if type(cmd) is Store:
        return cmd.key, encode_store("set", cmd.key, cmd.value, flags=cmd.flags, exptime=cmd.exptime), \
            ResponseKind.STORE
    if type(cmd) is Delete:
        return cmd.key, b"delete %b\r\n" % cmd.key, ResponseKind.DELETE
    if type(cmd) is Touch:
        return cmd.key, b"touch %b %d\r\n" % (cmd.key, cmd.exptime), ResponseKind.TOUCH
    if type(cmd) is MetaSet or type(cmd) is MetaDelete:
        return cmd.key, encode_command(strip_quiet(cmd)), ResponseKind.META
    raise TypeError(f"{type(cmd).__name__} is not an unconditional write")
