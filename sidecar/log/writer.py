"""The journal writer: group commit from trio to JetStream, every PubAck matched to its write.

Trio tasks call `publish` / `publish_atomic` and wait. A batcher takes everything
queued in one scheduling round and writes it to the sidecar's trio connection to
NATS (link.py) as one burst: each message with a reply subject under one wildcard ack
inbox (pipelined: no round trip per message). Each PubAck, as it is read, answers
its write. A write is `durable: true` only with a PubAck in hand:

- no PubAck within `publish_timeout`  -> unknown (it may or may not be stored)
- a PubAck carrying an error          -> false, with the server's description
- the connection lost before the PubAck -> unknown, at once
- not connected / no stream responded -> false, at once
- in-flight limits or ack latency over their bounds -> false ("overloaded"), at once
- a message over the server's max_payload -> false, at once, never sent: nats-server would
  close the connection for it, and every other writer's in-flight write would be lost with it
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import msgspec
import outcome
import trio

from sidecar.config import JournalSettings
from sidecar.envelope import MAX_PACK_BYTES, pack_payload
from sidecar.log.acks import Durable, JournalStats, Message, WriteResult, refused, result_from_ack
from sidecar.log.connection import NatsConnection
from sidecar.log.link import DEFAULT_MAX_PAYLOAD, NatsLink, new_inbox
from sidecar.log.wire import encode_headers, encode_publish, status_of, unsafe_header
from sidecar.logs import get_logger

__all__ = ["Durable", "JournalStats", "JournalWriter", "Message", "WriteResult"]

log = get_logger("journal")

# A scheduling round that queues this many writes sends them at once rather than at its end,
# so the server works on them while the round goes on.
EAGER_SEND_ENTRIES = 64
# Atomic batches: the server keeps at most 50 in flight per stream and 1000 messages each.
MAX_ATOMIC_MESSAGES = 1000
DUPLICATE_MESSAGE_IN_BATCH = 10201
# Room for what the writer adds to a message's headers (an atomic batch's id, sequence and commit).
HEADER_HEADROOM = 256


class _Write:
    """One logical write: a single message or an atomic batch of messages."""

    __slots__ = ("atomic", "done", "group", "messages", "nbytes", "result", "waiter")

    def __init__(self, messages: list[Message], atomic: bool, nbytes: int) -> None:
        self.messages = messages
        self.atomic = atomic
        self.nbytes = nbytes
        self.result: WriteResult | None = None
        self.waiter: trio.lowlevel.Task | None = None
        self.group: _Group | None = None
        self.done: Callable[[WriteResult], None] | None = None


class _Pack:
    """Packable writes of one subject in one burst, stored as one message; its place in the burst is
    where its first write was (`slot`), and it holds at most one write per key."""

    __slots__ = ("keys", "nbytes", "slot", "writes")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.writes: list[_Write] = []
        self.keys: set[str] = set()
        self.nbytes = 0


class _Group:
    """Writes submitted together (publish_many): one waiter for all of them."""

    __slots__ = ("done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()


class _Batch:
    __slots__ = ("remaining", "submitted", "writes")

    def __init__(self, writes: list[_Write], submitted: float) -> None:
        self.writes = writes
        self.remaining = len(writes)
        self.submitted = submitted  # trio time: ack latency (shedding, stats) and the publish deadline


# What a write waiting for in-flight room holds per entry besides its encoded messages (its models and
# results): the waiting line counts it against max_inflight_bytes.
WAITING_ENTRY_BYTES = 1024


def _waiting_cost(write: _Write) -> int:
    return write.nbytes + WAITING_ENTRY_BYTES * len(write.messages)


class JournalWriter:
    def __init__(self, conn: NatsConnection, settings: JournalSettings) -> None:
        self.conn = conn
        self.settings = settings
        self.stats = JournalStats()
        self._queue: list[_Write] = []
        self._wake = trio.Event()
        self._capacity_freed = trio.Event()
        self._waiting: deque[_Write] = deque()  # writers queued for in-flight room, first come first served
        # What those writers hold (their messages, and WAITING_ENTRY_BYTES an entry of objects), bounded
        # by max_inflight_bytes: past it a writer is refused at once instead of joining an unbounded line.
        # Bytes, not entries: a client pipelining small writes past a small entry limit waits its turn.
        self._waiting_bytes = 0
        self._inflight_batches: deque[_Batch] = deque()  # in submission order, so deadlines are too
        self._batch_sent = trio.Event()
        # full reply subject -> (write, or a pack's writes; batch; is_commit); a batch-start reply has
        # is_commit False
        self._pending: dict[bytes, tuple[_Write | list[_Write], _Batch, bool]] = {}
        self._tokens = itertools.count(1)
        self._link: NatsLink | None = None
        self._inbox = b""
        self._closed = False

    async def start(self, nursery: trio.Nursery) -> None:
        link = self.conn.link
        assert link is not None, "open the connection's link (open_journal does) before the writer"
        self._link = link
        inbox = new_inbox()
        self._inbox = inbox.encode()
        link.subscribe(f"{inbox}.*", self._on_reply)
        link.on_lost.append(self._on_lost)
        nursery.start_soon(self._batcher)
        nursery.start_soon(self._expire_loop)

    @property
    def connected(self) -> bool:
        return self.conn.connected and self._link is not None and self._link.connected

    @property
    def max_payload(self) -> int:
        """The server's limit for one message (headers and payload), from its INFO."""
        return self._link.max_payload if self._link is not None else DEFAULT_MAX_PAYLOAD

    def oversized(self, message: Message) -> str:
        """Why `message` must not be sent (over the server's max_payload), or ""."""
        limit = self.max_payload
        if len(message.payload) + HEADER_HEADROOM <= limit - 4096:  # nearly every write: no header encoding
            return ""
        size = len(message.payload) + len(encode_headers(message.headers)) + HEADER_HEADROOM
        if size <= limit:
            return ""
        return (f"journal refused the write: a message of {size} bytes is over the NATS server's max_payload "
                f"of {limit} bytes (not sent: the server would close the connection for it)")

    @property
    def link_error(self) -> str:
        return self._link.last_error if self._link is not None else "not started"

    # --- writers' side ---------------------------------------------------------------

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None,
                      pack_key: str = "") -> WriteResult:
        return await self._submit(_Write([Message(subject, payload, headers, pack_key)], False, len(payload)))

    def publish_then(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                     done: Callable[[WriteResult], None], pack_key: str = "") -> bool:
        """`publish` without a task: queue the write now and call `done(result)` on the trio loop
        when it is answered (`done` must not raise or block). False, with nothing queued, when the
        write would have to wait for in-flight room: await `publish` then.

        A front answering pipelined requests saves a task, two switches and a scheduling round
        per write this way, which is where its latency goes."""
        write = _Write([Message(subject, payload, headers, pack_key)], False, len(payload))
        refusal = self._refusal(write)
        if refusal is None and (self._waiting or self._over_capacity(write)):
            return False
        if refusal is not None:
            self._count_refused(write)
            done(refusal)
            return True
        self._reserve(write)
        write.done = done
        self._enqueue(write)
        return True

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
        for write in writes:  # an oversized message is refused on its own; the others still go
            if reason := self.oversized(write.messages[0]):
                write.result = refused(reason)
                self._count_refused(write)
        sending = [w for w in writes if w.result is None]
        # Capacity is reserved for all at once.
        total = _Write([w.messages[0] for w in sending], False, sum(w.nbytes for w in sending))
        refusal = await self._admit(total) if sending else None
        if refusal is not None:
            for write in sending:
                write.result = refusal
        elif sending:
            group = _Group(len(sending))
            for write in sending:
                write.group = group
            self._queue.extend(sending)
            self._wake.set()
            await group.done.wait()
        return [w.result for w in writes]  # type: ignore[misc]

    async def _admit(self, write: _Write) -> WriteResult | None:
        """Refuse at once, or reserve in-flight room (waiting at most the publish timeout).

        Admission is first come, first served: while anyone waits for room, later writers
        queue behind them, so writes a client pipelines are journaled in the order sent."""
        refusal = self._refusal(write)
        if refusal is None:
            if not self._waiting and not self._over_capacity(write):
                self._reserve(write)
                return None
            if self._waiting_full(write):
                refusal = refused("journal overloaded: in-flight limit reached and as much waiting for it; "
                                  "retry later")
            elif await self._wait_for_capacity(write):
                self._reserve(write)
                return None
            else:
                refusal = refused("journal overloaded: in-flight limit reached; retry later")
        self._count_refused(write)
        return refusal

    def _reserve(self, write: _Write) -> None:
        self.stats.inflight_entries += len(write.messages)
        self.stats.inflight_bytes += write.nbytes

    def _count_refused(self, write: _Write) -> None:
        self.stats.shed += len(write.messages)
        self.stats.failed += len(write.messages)

    def _enqueue(self, write: _Write) -> None:
        """Queue an admitted write for the next group commit; a full round goes out at once."""
        self._queue.append(write)
        self._wake.set()
        if len(self._queue) >= EAGER_SEND_ENTRIES:
            self._send_queued()

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
        self._enqueue(write)
        if write.result is not None:  # an eager send found the link down and answered at once
            return write.result
        # Park without an Event: settling reschedules this task with the result.
        # If the caller is cancelled the write still completes; only the answer is dropped.
        write.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            write.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _refusal(self, write: _Write) -> WriteResult | None:
        for message in write.messages:
            if message.headers and unsafe_header(message.headers) is not None:
                return refused("refused: a header would contain CR/LF or an invalid name")
        if self._closed:
            return refused("journal closed: the sidecar is shutting down")
        if not self.connected:
            return refused("journal unavailable: not connected to NATS")
        for message in write.messages:
            if reason := self.oversized(message):
                return refused(reason)
        if self._link is not None and self._link.congested:
            return refused("journal unavailable: NATS is not keeping up (link full)")
        if self._inflight_batches:
            age = trio.current_time() - self._inflight_batches[0].submitted
            if age > self.settings.shed_ack_latency:
                return refused(f"journal overloaded: acks are {age:.2f}s behind; retry later")
        return None

    def _waiting_full(self, write: _Write) -> bool:
        """No room to wait: as many bytes wait as may be in flight (the first may always wait)."""
        return bool(self._waiting) and self._waiting_bytes + _waiting_cost(write) > self.settings.max_inflight_bytes

    async def _wait_for_capacity(self, write: _Write) -> bool:
        """Queue for room in arrival order; False when the publish timeout passes first."""
        deadline = trio.current_time() + self.settings.publish_timeout
        self._waiting.append(write)
        self._waiting_bytes += _waiting_cost(write)
        try:
            while self._waiting[0] is not write or self._over_capacity(write):
                with trio.move_on_at(deadline):
                    await self._capacity_freed.wait()
                if trio.current_time() >= deadline:
                    return False
            return True
        finally:
            self._waiting.remove(write)
            self._waiting_bytes -= _waiting_cost(write)
            self._capacity_freed.set()  # the next in line re-checks
            self._capacity_freed = trio.Event()

    # --- the wire side ------------------------------------------------------------------

    async def _batcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # One scheduling round lets every runnable writer queue its write: group commit.
            await trio.lowlevel.checkpoint()
            self._send_queued()

    def _send_queued(self) -> None:
        max_batch = self.settings.max_batch_entries
        while self._queue:
            writes, self._queue = self._queue[:max_batch], self._queue[max_batch:]
            self._send(writes)

    def _send(self, writes: list[_Write]) -> None:
        assert self._link is not None
        batch = _Batch(writes, trio.current_time())
        if not self._link.connected or self._link.congested:
            reason = "not connected to NATS" if not self._link.connected else "NATS is not keeping up (link full)"
            for write in writes:
                self._settle(write, batch, refused(f"journal unavailable: {reason}"))
            return
        commands: list[bytes] = []
        packs: dict[str, _Pack] = {}  # subject -> its open pack
        pack_limit = min(MAX_PACK_BYTES, self.max_payload // 2)
        pack_entries = self.settings.pack_entries
        for write in writes:
            if write.atomic:
                for subject in {m.subject for m in write.messages} & packs.keys():
                    self._close_pack(packs.pop(subject), commands, batch)  # its writes came first
                commands += [encode_publish(m.subject, reply, m.headers, m.payload)
                             for m, reply in self._atomic_commands(write, batch)]
                continue
            message = write.messages[0]
            key = message.pack_key
            pack = packs.get(message.subject)
            if key:
                if pack is not None and (key in pack.keys or len(pack.writes) >= pack_entries
                                         or pack.nbytes + write.nbytes > pack_limit):
                    self._close_pack(pack, commands, batch)  # a key twice: its second entry in the next message
                    pack = None
                if pack is None:
                    pack = packs[message.subject] = _Pack(len(commands))
                    commands.append(b"")
                pack.writes.append(write)
                pack.keys.add(key)
                pack.nbytes += write.nbytes
                continue
            if pack is not None:  # a write that goes alone follows the pack of its subject, in order
                self._close_pack(packs.pop(message.subject), commands, batch)
            reply = self._reply_for(write, batch, True)
            commands.append(encode_publish(message.subject, reply, message.headers, message.payload))
        for pack in packs.values():
            self._close_pack(pack, commands, batch)
        self._inflight_batches.append(batch)
        self._link.send(b"".join(commands))
        self._batch_sent.set()

    def _close_pack(self, pack: _Pack, commands: list[bytes], batch: _Batch) -> None:
        """The pack's message, in its slot: one PubAck answers all its writes. A pack of one is the write's
        own message. A pack carries no Nats-Msg-Id: its entries' ids were made by walcar, once each, and
        nothing publishes them again."""
        writes = pack.writes
        first = writes[0].messages[0]
        if len(writes) == 1:
            reply = self._reply_for(writes[0], batch, True)
            commands[pack.slot] = encode_publish(first.subject, reply, first.headers, first.payload)
            return
        reply = b"%s.%d" % (self._inbox, next(self._tokens))
        self._pending[reply] = (writes, batch, True)
        payload = pack_payload([w.messages[0].payload for w in writes])
        commands[pack.slot] = encode_publish(first.subject, reply, None, payload)

    def _reply_for(self, write: _Write, batch: _Batch, is_commit: bool) -> bytes:
        reply = b"%s.%d" % (self._inbox, next(self._tokens))
        self._pending[reply] = (write, batch, is_commit)
        return reply

    def _atomic_commands(self, write: _Write, batch: _Batch) -> list[tuple[Message, bytes]]:
        """(message, reply) pairs of an atomic batch, with ADR-50's headers."""
        batch_id = f"{self._inbox.decode().rsplit('.', 1)[-1]}{next(self._tokens)}"
        last = len(write.messages)
        out = []
        for index, message in enumerate(write.messages, start=1):
            headers = dict(message.headers or {})
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(index)
            reply = b""
            if index == last:
                headers["Nats-Batch-Commit"] = "1"
                reply = self._reply_for(write, batch, True)
            elif index == 1:
                # The batch start is a request: an error reply means the batch never began.
                reply = self._reply_for(write, batch, False)
            out.append((Message(message.subject, message.payload, headers), reply))
        return out

    def _on_reply(self, subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
        """From the link's reader, for every message to the ack inbox."""
        entry = self._pending.pop(subject, None)
        if entry is None:
            return  # an ack after its write timed out, or a duplicate reply
        write, batch, is_commit = entry
        status = status_of(headers)
        if not is_commit and not data and not status:
            return  # the atomic batch has started
        result = result_from_ack(data, status)
        if isinstance(write, list):  # a pack: its PubAck answers each of its writes, at its one sequence
            for member in write:
                self._settle(member, batch, msgspec.structs.replace(result))
            return
        if not is_commit:
            if result.ok:
                return
            self._forget(write)  # the batch never began; its commit reply would only repeat that
        self._settle(write, batch, result)

    def _on_lost(self, reason: str) -> None:
        """The link broke: whatever was published and not acked may or may not be stored."""
        unknown = WriteResult(Durable.UNKNOWN, message=f"connection to NATS lost before the PubAck "
                                                        f"({reason}); the write may be stored")
        self._pending.clear()
        while self._inflight_batches:
            batch = self._inflight_batches.popleft()
            for write in batch.writes:
                self._settle(write, batch, unknown)

    async def _expire_loop(self) -> None:
        """Batches are sent in deadline order: sleep until the oldest one's, answer what it still owes."""
        timeout = self.settings.publish_timeout
        unknown = WriteResult(
            Durable.UNKNOWN, message=f"no PubAck from the journal within {timeout:g}s; the write may be stored"
        )
        while True:
            if not self._inflight_batches:
                self._batch_sent = trio.Event()
                await self._batch_sent.wait()
                continue
            batch = self._inflight_batches[0]
            deadline = batch.submitted + timeout
            if batch.remaining and trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            if batch.remaining:
                for reply in [r for r, (_, b, _) in self._pending.items() if b is batch]:
                    del self._pending[reply]
                for write in batch.writes:
                    self._settle(write, batch, unknown)
            self._drop_finished()

    def _forget(self, write: _Write) -> None:
        for reply in [r for r, (w, _, _) in self._pending.items() if w is write]:
            del self._pending[reply]

    def _drop_finished(self) -> None:
        batches = self._inflight_batches
        while batches and batches[0].remaining == 0:
            batches.popleft()

    def _settle(self, write: _Write, batch: _Batch, result: WriteResult) -> None:
        if write.result is not None:
            return
        write.result = result
        stats = self.stats
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
        elif write.done is not None:
            try:
                write.done(result)
            except Exception:  # a front's bug must not take the link's reader (and every write) down
                log.error("write_answer_failed", exc_info=True)
        elif write.group is not None:
            write.group.remaining -= 1
            if write.group.remaining == 0:
                write.group.done.set()
        batch.remaining -= 1
        if batch.remaining == 0:
            stats.last_ack_latency = trio.current_time() - batch.submitted
            self._drop_finished()
        self._capacity_freed.set()

    async def drain(self) -> None:
        """Wait until every accepted write has its answer (used at shutdown)."""
        while self._queue or self.stats.inflight_entries:
            await self._capacity_freed.wait()

    def close(self) -> None:
        """Refuse new writes; accepted ones still get their answers."""
        self._closed = True
