"""The journal writer: group commit from trio to JetStream, every PubAck matched to its write.

Trio tasks call `publish` / `publish_atomic` and wait. A batcher hands everything
queued to the NATS thread in one crossing; there each message is published with a
reply subject under one wildcard ack inbox (pipelined: no round trip per message),
and when every ack of the batch is in — or the publish timeout fires — the results
cross back in one call. A write is `durable: true` only with a PubAck in hand:

- no PubAck within `publish_timeout`  -> unknown (it may or may not be stored)
- a PubAck carrying an error          -> false, with the server's description
- not connected / no stream responded -> false, at once
- in-flight limits or ack latency over their bounds -> false ("overloaded"), at once
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from enum import StrEnum
from typing import Any

import msgspec
import outcome
import trio
from nats.aio.msg import Msg

from sidecar.config import JournalSettings
from sidecar.log import fastpath
from sidecar.log.connection import NatsConnection
from sidecar.log.handoff import Handoff
from sidecar.logs import get_logger

log = get_logger("journal")

# Atomic batches: the server keeps at most 50 in flight per stream and 1000 messages each.
MAX_ATOMIC_MESSAGES = 1000
DUPLICATE_MESSAGE_IN_BATCH = 10201


class Durable(StrEnum):
    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"


class WriteResult(msgspec.Struct, omit_defaults=True):
    durable: Durable
    sequence: int = 0  # stream sequence of the (last) message
    count: int = 1  # messages stored: an atomic batch stores all of them, sequences count..sequence
    duplicate: bool = False
    message: str = ""
    stream: str = ""

    @property
    def ok(self) -> bool:
        return self.durable is Durable.TRUE

    @property
    def first_sequence(self) -> int:
        return self.sequence - self.count + 1 if self.sequence else 0


class Message(msgspec.Struct, frozen=True, array_like=True):
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str = ""
    count: int = 0
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class _Write:
    """One logical write: a single message or an atomic batch of messages."""

    __slots__ = ("atomic", "group", "messages", "nbytes", "result", "waiter")

    def __init__(self, messages: list[Message], atomic: bool, nbytes: int) -> None:
        self.messages = messages
        self.atomic = atomic
        self.nbytes = nbytes
        self.result: WriteResult | None = None
        self.waiter: trio.lowlevel.Task | None = None
        self.group: _Group | None = None


class _Group:
    """Writes submitted together (publish_many): one waiter for all of them."""

    __slots__ = ("done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()


class _Batch:
    __slots__ = ("remaining", "submitted", "timer", "writes")

    def __init__(self, writes: list[_Write]) -> None:
        self.writes = writes
        self.remaining = 0
        self.submitted = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None


class JournalStats:
    """Counters the memcached `stats` command, the admin endpoint and metrics read."""

    __slots__ = ("acked", "duplicates", "failed", "inflight_bytes", "inflight_entries", "last_ack_latency", "shed",
                 "unknown")

    def __init__(self) -> None:
        self.acked = 0
        self.duplicates = 0
        self.failed = 0
        self.unknown = 0
        self.shed = 0
        self.inflight_entries = 0
        self.inflight_bytes = 0
        self.last_ack_latency = 0.0


def _fail(message: str) -> WriteResult:
    return WriteResult(Durable.FALSE, message=message)


def _status_of(headers: bytes | None) -> bytes:
    """The inline status of a server reply ("NATS/1.0 503\\r\\n...") or b""."""
    if headers and headers.startswith(b"NATS/1.0 "):
        return headers[9:12]
    return b""


def _result_from_ack(data: bytes, status: bytes) -> WriteResult:
    if status == b"503":
        return _fail("journal stream unavailable: no responders (is the stream provisioned?)")
    try:
        ack = _ack_decoder.decode(data)
    except msgspec.DecodeError:
        return WriteResult(Durable.UNKNOWN, message=f"unreadable PubAck: {data[:80]!r}")
    if ack.error is not None:
        description = str(ack.error.get("description", "error"))
        if ack.error.get("err_code") == DUPLICATE_MESSAGE_IN_BATCH:
            # The batch's ids are all in the stream already: a retry of a stored mutation.
            return WriteResult(Durable.TRUE, duplicate=True, message=description)
        return _fail(f"journal rejected the write: {description}")
    return WriteResult(
        Durable.TRUE, sequence=ack.seq, count=max(ack.count, 1), duplicate=ack.duplicate, stream=ack.stream
    )


class _NatsSide:
    """Everything here runs on the NATS (asyncio) thread."""

    def __init__(self, writer: JournalWriter, inbox: str, use_fastpath: bool) -> None:
        self.writer = writer
        self.inbox = inbox.encode()
        self.use_fastpath = use_fastpath
        self.queue: asyncio.Queue[_Batch] = asyncio.Queue()
        # full reply subject -> (write, batch, is_commit); a batch-start reply has is_commit False
        self.pending: dict[bytes, tuple[_Write, _Batch, bool]] = {}
        self.tokens = itertools.count(1)
        # Settled writes and finished batches cross back to trio together, once per loop
        # iteration: all the acks of one socket read share one crossing.
        self.settled: list[_Write] = []
        self.finished: list[_Batch] = []
        self.flush_scheduled = False

    async def start(self) -> None:
        nc = self.writer.conn.nc
        assert nc is not None
        subject = f"{self.inbox.decode()}.*"
        if self.use_fastpath:
            sub = await nc.subscribe(subject)
            fastpath.route(nc, sub._id, self.on_raw_ack)
        else:
            await nc.subscribe(subject, cb=self.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        asyncio.get_running_loop().create_task(self.send_loop())

    async def send_loop(self) -> None:
        while True:
            batch = await self.queue.get()
            try:
                await self.send(batch)
            except Exception as exc:  # a bug here must fail the writes, never hang them
                log.error("journal_send_failed", exc_info=True, error=str(exc))
                self.settle_all(batch, _fail(f"journal send failed: {exc}"))

    def reply_for(self, write: _Write, batch: _Batch, is_commit: bool) -> bytes:
        reply = b"%s.%d" % (self.inbox, next(self.tokens))
        self.pending[reply] = (write, batch, is_commit)
        return reply

    def commands_for(self, write: _Write, batch: _Batch) -> list[tuple[Message, bytes]]:
        """(message, reply) pairs; an atomic batch follows ADR-50's headers."""
        if not write.atomic:
            return [(write.messages[0], self.reply_for(write, batch, True))]
        batch_id = f"{self.inbox.decode().rsplit('.', 1)[-1]}{next(self.tokens)}"
        last = len(write.messages)
        out = []
        for index, message in enumerate(write.messages, start=1):
            headers = dict(message.headers or {})
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(index)
            reply = b""
            if index == last:
                headers["Nats-Batch-Commit"] = "1"
                reply = self.reply_for(write, batch, True)
            elif index == 1:
                # The batch start is a request: an error reply means the batch never began.
                reply = self.reply_for(write, batch, False)
            out.append((Message(message.subject, message.payload, headers), reply))
        return out

    async def send(self, batch: _Batch) -> None:
        nc = self.writer.conn.nc
        batch.remaining = len(batch.writes)
        if nc is None or not nc.is_connected:
            self.settle_all(batch, _fail("journal unavailable: not connected to NATS"))
            return
        batch.submitted = time.monotonic()
        if self.use_fastpath:
            commands = []
            for write in batch.writes:
                for message, reply in self.commands_for(write, batch):
                    commands.append(fastpath.encode_publish(message.subject, reply, message.headers, message.payload))
            try:
                await fastpath.append_commands(nc, commands, sum(len(c) for c in commands))
            except Exception as exc:  # the connection broke under us
                self.settle_all(batch, _fail(f"journal publish failed: {type(exc).__name__}: {exc}"))
                return
        else:
            for write in batch.writes:
                try:
                    for message, reply in self.commands_for(write, batch):
                        await nc.publish(message.subject, message.payload, reply.decode(), message.headers)
                except Exception as exc:  # nats-py raises on a closed or over-full connection
                    self.forget(write)
                    self.settle(write, batch, _fail(f"journal publish failed: {type(exc).__name__}: {exc}"))
        # Acks may already have settled everything while the flush was awaited.
        if batch.remaining > 0:
            batch.timer = asyncio.get_running_loop().call_later(
                self.writer.settings.publish_timeout, self.expire, batch
            )

    def forget(self, write: _Write) -> None:
        for reply in [r for r, (w, _, _) in self.pending.items() if w is write]:
            del self.pending[reply]

    def on_raw_ack(self, subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
        entry = self.pending.pop(subject, None)
        if entry is not None:
            self.resolve(entry, data, _status_of(headers))

    async def on_msg(self, msg: Msg) -> None:
        entry = self.pending.pop(msg.subject.encode(), None)
        if entry is not None:
            status = (msg.headers or {}).get("Status", "").encode()
            self.resolve(entry, msg.data, status)

    def resolve(self, entry: tuple[_Write, _Batch, bool], data: bytes, status: bytes) -> None:
        write, batch, is_commit = entry
        if not is_commit and not data and not status:
            return  # the atomic batch has started
        result = _result_from_ack(data, status)
        if not is_commit:
            if result.ok:
                return
            self.forget(write)  # the batch never began; its commit reply would only repeat that
        self.settle(write, batch, result)

    def settle(self, write: _Write, batch: _Batch, result: WriteResult) -> None:
        if write.result is not None:
            return
        write.result = result
        self.settled.append(write)
        batch.remaining -= 1
        if batch.remaining == 0:
            if batch.timer is not None:
                batch.timer.cancel()
            self.finished.append(batch)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        settled, finished = self.settled, self.finished
        self.settled, self.finished = [], []
        self.writer.settled.put((settled, finished))

    def expire(self, batch: _Batch) -> None:
        timeout = self.writer.settings.publish_timeout
        unknown = WriteResult(
            Durable.UNKNOWN, message=f"no PubAck from the journal within {timeout:g}s; the write may be stored"
        )
        self.settle_all(batch, unknown)

    def settle_all(self, batch: _Batch, result: WriteResult) -> None:
        for write in batch.writes:
            self.forget(write)
            self.settle(write, batch, result)


class JournalWriter:
    def __init__(self, conn: NatsConnection, settings: JournalSettings, use_fastpath: bool = True) -> None:
        self.conn = conn
        self.use_fastpath = use_fastpath
        self.settings = settings
        self.stats = JournalStats()
        self._queue: list[_Write] = []
        self._wake = trio.Event()
        self._capacity_freed = trio.Event()
        self._waiting: deque[_Write] = deque()  # writers queued for in-flight room, first come first served
        self._inflight_batches: deque[_Batch] = deque()
        self._nats: _NatsSide | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    async def start(self, nursery: trio.Nursery) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        nc = self.conn.nc
        assert nc is not None, "connect before starting the journal writer"
        self._nats = _NatsSide(self, nc.new_inbox(), self.use_fastpath and fastpath.supported(nc))
        await self.conn.bridge.run(self._nats.start)
        queue = self._nats.queue
        # One thread wake-up per burst in each direction (see handoff.py).
        self.outbox: Handoff[_Batch] = Handoff(self.conn.bridge.loop.call_soon_threadsafe,
                                               lambda batches: [queue.put_nowait(b) for b in batches])
        self.settled: Handoff[tuple[list[_Write], list[_Batch]]] = Handoff(self.conn.to_trio, self._settle_all)
        nursery.start_soon(self._batcher)

    # --- trio side -------------------------------------------------------------

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> WriteResult:
        return await self._submit(_Write([Message(subject, payload, headers)], False, len(payload)))

    async def publish_atomic(self, messages: list[Message]) -> WriteResult:
        """All messages stored or none (JetStream atomic batch); at most 1000 messages."""
        if not messages:
            raise ValueError("an atomic batch needs at least one message")
        if len(messages) > MAX_ATOMIC_MESSAGES:
            raise ValueError(f"an atomic batch holds at most {MAX_ATOMIC_MESSAGES} messages")
        nbytes = sum(len(m.payload) for m in messages)
        return await self._submit(_Write(messages, True, nbytes))

    async def publish_many(self, messages: list[Message]) -> list[WriteResult]:
        """Independent writes queued together, in order, so they share a group commit and keep their order."""
        writes = [_Write([m], False, len(m.payload)) for m in messages]
        if not writes:
            return []
        total = _Write(messages, False, sum(w.nbytes for w in writes))  # capacity is reserved for all at once
        refusal = await self._admit(total)
        if refusal is not None:
            return [refusal] * len(writes)
        group = _Group(len(writes))
        for write in writes:
            write.group = group
        self._queue.extend(writes)
        self._wake.set()
        await group.done.wait()
        return [w.result for w in writes]  # type: ignore[misc]

    async def _admit(self, write: _Write) -> WriteResult | None:
        """Refuse at once, or reserve in-flight room (waiting at most the publish timeout).

        Admission is first come, first served: while anyone waits for room, later writers
        queue behind them, so writes a client pipelines are journaled in the order sent."""
        stats = self.stats
        refusal = self._refusal(write)
        if refusal is None:
            if (self._waiting or self._over_capacity(write)) and not await self._wait_for_capacity(write):
                refusal = _fail("journal overloaded: in-flight limit reached; retry later")
            else:
                stats.inflight_entries += len(write.messages)
                stats.inflight_bytes += write.nbytes
                return None
        stats.shed += len(write.messages)
        stats.failed += len(write.messages)
        return refusal

    def _over_capacity(self, write: _Write) -> bool:
        stats, settings = self.stats, self.settings
        return stats.inflight_entries > 0 and (
            stats.inflight_entries + len(write.messages) > settings.max_inflight_entries
            or stats.inflight_bytes + write.nbytes > settings.max_inflight_bytes
        )

    async def _submit(self, write: _Write) -> WriteResult:
        refusal = await self._admit(write)
        if refusal is not None:
            return refusal
        self._queue.append(write)
        self._wake.set()
        # Park without an Event: the settle step reschedules this task with the result.
        # If the caller is cancelled the write still completes; only the answer is dropped.
        write.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            write.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _refusal(self, write: _Write) -> WriteResult | None:
        if self._closed:
            return _fail("journal closed: the sidecar is shutting down")
        if not self.conn.connected:
            return _fail("journal unavailable: not connected to NATS")
        if self._inflight_batches:
            age = time.monotonic() - self._inflight_batches[0].submitted
            if age > self.settings.shed_ack_latency:
                return _fail(f"journal overloaded: acks are {age:.2f}s behind; retry later")
        return None

    async def _wait_for_capacity(self, write: _Write) -> bool:
        """Queue for room in arrival order; False when the publish timeout passes first."""
        deadline = trio.current_time() + self.settings.publish_timeout
        self._waiting.append(write)
        try:
            while self._waiting[0] is not write or self._over_capacity(write):
                with trio.move_on_at(deadline):
                    await self._capacity_freed.wait()
                if trio.current_time() >= deadline:
                    return False
            return True
        finally:
            self._waiting.remove(write)
            self._capacity_freed.set()  # the next in line re-checks
            self._capacity_freed = trio.Event()

    async def _batcher(self) -> None:
        max_batch = self.settings.max_batch_entries
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # One scheduling round lets every runnable writer queue its write: group commit.
            await trio.sleep(0)
            while self._queue:
                writes, self._queue = self._queue[:max_batch], self._queue[max_batch:]
                batch = _Batch(writes)
                self._inflight_batches.append(batch)
                assert self._nats is not None
                self.outbox.put(batch)

    def _settle_all(self, items: list[tuple[list[_Write], list[_Batch]]]) -> None:
        for writes, batches in items:
            self._settle(writes, batches)

    def _settle(self, writes: list[_Write], batches: list[_Batch]) -> None:
        stats = self.stats
        for write in writes:
            result = write.result
            assert result is not None
            if result.durable is Durable.TRUE:
                stats.acked += 1
                if result.duplicate:
                    stats.duplicates += 1
            elif result.durable is Durable.UNKNOWN:
                stats.unknown += 1
            else:
                stats.failed += 1
            stats.inflight_entries -= len(write.messages)
            stats.inflight_bytes -= write.nbytes
            if write.waiter is not None:
                trio.lowlevel.reschedule(write.waiter, outcome.Value(result))
                write.waiter = None
            elif write.group is not None:
                write.group.remaining -= 1
                if write.group.remaining == 0:
                    write.group.done.set()
        now = time.monotonic()
        for batch in batches:
            stats.last_ack_latency = now - batch.submitted
            try:
                self._inflight_batches.remove(batch)
            except ValueError:
                pass
        self._capacity_freed.set()
        self._capacity_freed = trio.Event()

    async def drain(self) -> None:
        """Wait until every accepted write has its answer (used at shutdown)."""
        while self._queue or self.stats.inflight_entries:
            await self._capacity_freed.wait()

    def close(self) -> None:
        """Refuse new writes; accepted ones still get their answers."""
        self._closed = True
