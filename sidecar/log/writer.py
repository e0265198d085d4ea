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
from sidecar.log.writes import Batch, Group, Pack, Write, packed_ahead, waiting_cost
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


class JournalWriter:
    def __init__(self, conn: NatsConnection, settings: JournalSettings) -> None:
        self.conn = conn
        self.settings = settings
        self.stats = JournalStats()
        self._queue: list[Write] = []
        self._wake = trio.Event()
        self._capacity_freed = trio.Event()
        self._waiting: deque[Write] = deque()  # writers queued for in-flight room, first come first served
        # What those writers hold (their messages, and WAITING_ENTRY_BYTES an entry of objects), bounded
        # by max_inflight_bytes: past it a writer is refused at once instead of joining an unbounded line.
        # Bytes, not entries: a client pipelining small writes past a small entry limit waits its turn.
        self._waiting_bytes = 0
        self._inflight_batches: deque[Batch] = deque()  # in submission order, so deadlines are too
        self._batch_sent = trio.Event()
        # full reply subject -> (write, or a pack's writes; batch; is_commit); a batch-start reply has
        # is_commit False
        self._pending: dict[bytes, tuple[Write | list[Write], Batch, bool]] = {}
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
        return await self._submit(Write([Message(subject, payload, headers, pack_key)], False, len(payload)))

    def publish_then(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                     done: Callable[[WriteResult], None], pack_key: str = "") -> bool:
        """`publish` without a task: queue the write now and call `done(result)` on the trio loop
        when it is answered (`done` must not raise or block). False, with nothing queued, when the
        write would have to wait for in-flight room: await `publish` then.

        A front answering pipelined requests saves a task, two switches and a scheduling round
        per write this way, which is where its latency goes."""
        write = Write([Message(subject, payload, headers, pack_key)], False, len(payload))
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
        return await self._submit(Write(messages, True, nbytes))

    async def publish_many(self, messages: list[Message]) -> list[WriteResult]:
        """Independent writes queued together, in order, so they share a group commit and keep their order.

        Packable messages of one subject are packed here, by the rules `_send` packs a round's single
        writes by: one write, one PubAck and one answer for a whole pack instead of one a message. The
        members of a pack are answered with the same WriteResult object (not to be changed by callers)."""
        writes, places = packed_ahead(messages, *self._pack_limits())
        for write in writes:  # an oversized message is refused on its own; the others still go
            if reason := self.oversized(write.messages[0]):
                write.result = refused(reason)
                self._count_refused(write)
        sending = [w for w in writes if w.result is None]
        # Capacity is reserved for all at once.
        total = Write([w.messages[0] for w in sending], False, sum(w.nbytes for w in sending),
                       sum(w.entries for w in sending))
        refusal = await self._admit(total) if sending else None
        if refusal is not None:
            for write in sending:
                write.result = refusal
        elif sending:
            group = Group(len(sending))
            for write in sending:
                write.group = group
            self._queue.extend(sending)
            self._wake.set()
            await group.done.wait()
        return [writes[place].result for place in places]  # type: ignore[misc]

    async def _admit(self, write: Write) -> WriteResult | None:
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

    def _reserve(self, write: Write) -> None:
        self.stats.inflight_entries += write.entries
        self.stats.inflight_bytes += write.nbytes

    def _count_refused(self, write: Write) -> None:
        self.stats.shed += write.entries
        self.stats.failed += write.entries

    def _enqueue(self, write: Write) -> None:
        """Queue an admitted write for the next group commit; a full round goes out at once."""
        self._queue.append(write)
        self._wake.set()
        if len(self._queue) >= EAGER_SEND_ENTRIES:
            self._send_queued()

    def _over_capacity(self, write: Write) -> bool:
        stats, settings = self.stats, self.settings
        return stats.inflight_entries > 0 and (
            stats.inflight_entries + write.entries > settings.max_inflight_entries
            or stats.inflight_bytes + write.nbytes > settings.max_inflight_bytes
        )

    async def _submit(self, write: Write) -> WriteResult:
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

    def _refusal(self, write: Write) -> WriteResult | None:
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

    def _waiting_full(self, write: Write) -> bool:
        """No room to wait: as many bytes wait as may be in flight (the first may always wait)."""
        return bool(self._waiting) and self._waiting_bytes + waiting_cost(write) > self.settings.max_inflight_bytes

    async def _wait_for_capacity(self, write: Write) -> bool:
        """Queue for room in arrival order; False when the publish timeout passes first."""
        deadline = trio.current_time() + self.settings.publish_timeout
        self._waiting.append(write)
        self._waiting_bytes += waiting_cost(write)
        try:
            while self._waiting[0] is not write or self._over_capacity(write):
                with trio.move_on_at(deadline):
                    await self._capacity_freed.wait()
                if trio.current_time() >= deadline:
                    return False
            return True
        finally:
            self._waiting.remove(write)
            self._waiting_bytes -= waiting_cost(write)
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
        """The queue in bursts of at most max_batch_entries entries (a write packed ahead holds many; a
        write holding more than the bound goes in a burst of its own)."""
        max_batch = self.settings.max_batch_entries
        queue, self._queue = self._queue, []
        start = 0
        while start < len(queue):
            end, entries = start, 0
            while end < len(queue) and (end == start or entries + queue[end].entries <= max_batch):
                entries += queue[end].entries
                end += 1
            self._send(queue[start:end])
            start = end

    def _send(self, writes: list[Write]) -> None:
        assert self._link is not None
        batch = Batch(writes, trio.current_time())
        if not self._link.connected or self._link.congested:
            reason = "not connected to NATS" if not self._link.connected else "NATS is not keeping up (link full)"
            for write in writes:
                self._settle(write, batch, refused(f"journal unavailable: {reason}"))
            return
        commands: list[bytes] = []
        packs: dict[str, Pack[Write]] = {}  # subject -> its open pack
        pack_limit, pack_entries = self._pack_limits()
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
                if pack is not None and not pack.takes(key, write.nbytes, pack_entries, pack_limit):
                    self._close_pack(pack, commands, batch)
                    pack = None
                if pack is None:
                    pack = packs[message.subject] = Pack(len(commands))
                    commands.append(b"")
                pack.add(write, key, write.nbytes)
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

    def _pack_limits(self) -> tuple[int, int]:
        """A pack's most bytes and entries."""
        return min(MAX_PACK_BYTES, self.max_payload // 2), self.settings.pack_entries

    def _close_pack(self, pack: Pack[Write], commands: list[bytes], batch: Batch) -> None:
        """The pack's message, in its slot: one PubAck answers all its writes. A pack of one is the write's
        own message. A pack carries no Nats-Msg-Id: its entries' ids were made by walcar, once each, and
        nothing publishes them again."""
        writes = pack.members
        first = writes[0].messages[0]
        if len(writes) == 1:
            reply = self._reply_for(writes[0], batch, True)
            commands[pack.slot] = encode_publish(first.subject, reply, first.headers, first.payload)
            return
        reply = b"%s.%d" % (self._inbox, next(self._tokens))
        self._pending[reply] = (writes, batch, True)
        payload = pack_payload([w.messages[0].payload for w in writes])
        commands[pack.slot] = encode_publish(first.subject, reply, None, payload)

    def _reply_for(self, write: Write, batch: Batch, is_commit: bool) -> bytes:
        reply = b"%s.%d" % (self._inbox, next(self._tokens))
        self._pending[reply] = (write, batch, is_commit)
        return reply

    def _atomic_commands(self, write: Write, batch: Batch) -> list[tuple[Message, bytes]]:
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

    def _forget(self, write: Write) -> None:
        for reply in [r for r, (w, _, _) in self._pending.items() if w is write]:
            del self._pending[reply]

    def _drop_finished(self) -> None:
        batches = self._inflight_batches
        while batches and batches[0].remaining == 0:
            batches.popleft()

    def _settle(self, write: Write, batch: Batch, result: WriteResult) -> None:
        if write.result is not None:
            return
        write.result = result
        stats = self.stats
        answered = 1 if write.atomic else write.entries  # an atomic batch is one write; a pack, one a member
        if result.durable is Durable.TRUE:
            stats.acked += answered
            if result.duplicate:
                stats.duplicates += answered
        elif result.durable is Durable.UNKNOWN:
            stats.unknown += answered
        else:
            stats.failed += answered
        stats.inflight_entries -= write.entries
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
