"""A namespace's journal range, read in stream order, a batch per crossing to the NATS thread.

Bounds resolve to stream sequences once, when the job starts: a time becomes the
first sequence stored at or after it (`STREAM.MSG.GET` by `start_time`), an open
end becomes the last sequence at that moment, so a replay terminates and a resumed
one covers exactly the range the first run meant, however much was written since.

Reading uses an ephemeral pull consumer (no acks, memory storage, filtered to the
partition subjects `wal.<ns>.*`, so scheduled-but-undelivered entries are not read
twice), asked for hundreds of messages per crossing (`Puller`, ~100k entries/s on
a 2-core box); a reader task keeps one batch ahead of the job.

Retention: a stream only holds its namespace's replay window. Asking for a time or
sequence the stream no longer holds is an error naming the oldest entry still
there and the window, never a silent partial replay.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import trio

from sidecar.config import Namespace, stream_name
from sidecar.drain.consumer import parse_reply
from sidecar.envelope import Entry, decode_message
from sidecar.log import fastpath
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.logs import get_logger
from sidecar.replay.filters import NS_PER_S, SeqBound, TimeBound, format_time, parse_bound
from sidecar.replay.request import ReplayError
from sidecar.units import Duration

log = get_logger("replay.reader")

NO_MESSAGE_FOUND = 10037
FETCH_ATTEMPTS = 8
PULL_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Journaled:
    """One stored entry: its message's sequence and stream time, and the entry (None if undecodable).
    The entries of a pack share their message's sequence."""

    seq: int
    time_ns: int
    entry: Entry | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class StreamState:
    first_seq: int
    first_ns: int
    last_seq: int
    last_ns: int
    messages: int

    @property
    def lost(self) -> bool:
        """Whether entries were removed from the front (aged out of the replay window, or purged)."""
        return self.first_seq > 1


@dataclass(frozen=True, slots=True)
class SeqRange:
    first: int
    last: int  # inclusive; first > last: empty

    @property
    def empty(self) -> bool:
        return self.first > self.last

    @property
    def size(self) -> int:
        return max(0, self.last - self.first + 1)


def parse_nats_time(text: str) -> int:
    """JetStream's RFC3339 with nanoseconds -> ns since the epoch (0 for Go's zero time)."""
    if not text or text.startswith("0001-"):
        return 0
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(f"{head}+00:00").timestamp())
    return seconds * NS_PER_S + int((frac + "000000000")[:9])


class RetentionError(ReplayError):
    pass


class Batches:
    """`async for batch in batches`; a failure of the reader task is raised at the end, as itself."""

    def __init__(self, receive: trio.MemoryReceiveChannel[list[Journaled]]) -> None:
        self._receive = receive
        self.error: ReplayError | None = None

    def __aiter__(self) -> AsyncIterator[list[Journaled]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[Journaled]]:
        async for batch in self._receive:
            yield batch
        if self.error is not None:
            raise self.error


class JournalReader:
    def __init__(self, conn: NatsConnection, namespace: str, ns: Namespace) -> None:
        self.conn = conn
        self.namespace = namespace
        self.ns = ns
        self.stream = stream_name(namespace)

    async def state(self) -> StreamState:
        try:
            info = await self.conn.js_api(f"STREAM.INFO.{self.stream}")
        except JetStreamApiError as exc:
            raise ReplayError(f"cannot read the journal of namespace {self.namespace!r}: {exc.description}",
                              exit_code=1) from None
        state = info["state"]
        return StreamState(
            first_seq=int(state.get("first_seq", 0)),
            first_ns=parse_nats_time(state.get("first_ts", "")),
            last_seq=int(state.get("last_seq", 0)),
            last_ns=parse_nats_time(state.get("last_ts", "")),
            messages=int(state.get("messages", 0)),
        )

    async def seq_at(self, time_ns: int) -> int | None:
        """The first sequence stored at or after `time_ns`; None when nothing is."""
        moment = format_time(time_ns).replace("Z", "") + f"{time_ns % 1000:03d}Z"
        try:
            reply = await self.conn.js_api(f"STREAM.MSG.GET.{self.stream}", {"start_time": moment})
        except JetStreamApiError as exc:
            if exc.err_code == NO_MESSAGE_FOUND:
                return None
            raise
        return int(reply["message"]["seq"])

    def _retention_error(self, asked: str, state: StreamState) -> RetentionError:
        window = Duration(self.ns.replay_window)
        if state.messages == 0:
            return RetentionError(
                f"namespace {self.namespace!r}: --from {asked} is older than anything its journal still holds: "
                f"every entry up to seq {state.last_seq} (the last written {format_time(state.last_ns)}) has aged "
                f"out: the replay window is {window}; nothing from that time can be replayed"
            )
        return RetentionError(
            f"namespace {self.namespace!r}: --from {asked} is before the oldest entry its journal still holds "
            f"(seq {state.first_seq}, journaled {format_time(state.first_ns)}); the replay window is {window}. "
            f"Entries before that are gone: replay from {format_time(state.first_ns)} (or seq:{state.first_seq}) "
            "with a snapshot taken after it."
        )

    async def resolve(self, start: str | None, end: str | None, now_ns: int) -> SeqRange:
        """--from/--to -> an inclusive sequence range; RetentionError if --from is no longer held."""
        state = await self.state()
        first = max(1, state.first_seq)
        if start is not None:
            bound = parse_bound(start, now_ns)
            if isinstance(bound, SeqBound):
                if state.lost and bound.seq < state.first_seq:
                    raise self._retention_error(start, state)
                first = max(first, bound.seq)
            else:
                if state.lost and (bound.ns < state.first_ns if state.messages else bound.ns <= state.last_ns):
                    raise self._retention_error(start, state)
                found = await self.seq_at(bound.ns)
                first = found if found is not None else state.last_seq + 1
        last = state.last_seq
        if end is not None:
            bound = parse_bound(end, now_ns)
            if isinstance(bound, SeqBound):
                last = min(last, bound.seq)
            else:
                assert isinstance(bound, TimeBound)
                after = await self.seq_at(bound.ns + 1)
                last = min(last, after - 1) if after is not None else last
        if start is not None and end is not None and first > last and state.messages:
            begin, finish = parse_bound(start, now_ns), parse_bound(end, now_ns)
            if type(begin) is type(finish) and _value(begin) > _value(finish):
                raise ReplayError(f"--from {start} is after --to {end}")
        return SeqRange(first, last)

    async def check_still_held(self, first: int, asked: str) -> None:
        """Before reading: the range's start may have aged out since the job was planned (or checkpointed)."""
        state = await self.state()
        if state.lost and first < state.first_seq:
            raise self._retention_error(asked, state)

    @asynccontextmanager
    async def read(self, rng: SeqRange, batch: int) -> AsyncIterator[Batches]:
        """Batches of the range in stream order; a reader task stays one batch ahead of the consumer."""
        send, receive = trio.open_memory_channel[list[Journaled]](1)
        batches = Batches(receive)

        async def produce() -> None:
            try:
                await self._produce(rng, batch, send)
            except Exception as exc:  # handed to the consumer, unwrapped, when it reaches the end
                log.warning("replay_read_failed", namespace=self.namespace, error=f"{type(exc).__name__}: {exc}")
                batches.error = ReplayError(f"reading the journal of namespace {self.namespace!r} failed: "
                                            f"{type(exc).__name__}: {exc}", exit_code=1)
                await send.aclose()

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if rng.empty:
                await send.aclose()
            else:
                nursery.start_soon(produce)
            try:
                yield batches
            except Exception as exc:  # the job's own error: re-raised as itself, not wrapped by this nursery
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _produce(self, rng: SeqRange, batch: int, send: trio.MemorySendChannel[list[Journaled]]) -> None:
        name = f"replay-{uuid.uuid4().hex[:12]}"
        config = {
            "name": name,
            "filter_subject": f"wal.{self.namespace}.*",
            "ack_policy": "none",
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": rng.first,
            "replay_policy": "instant",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 60 * NS_PER_S,
        }
        async with send:
            created = await self.conn.js_api(f"CONSUMER.CREATE.{self.stream}.{name}",
                                             {"stream_name": self.stream, "config": config, "action": "create"})
            try:
                if int(created.get("num_pending", 0)) == 0:
                    return
                nc = self.conn.nc
                assert nc is not None
                puller = await self.conn.bridge.run(lambda: Puller.open(nc, self.stream, name))
                try:
                    await self._pull_all(puller, rng, batch, send)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await self.conn.bridge.run(puller.close)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.conn.js_api(f"CONSUMER.DELETE.{self.stream}.{name}")
                    except Exception as exc:  # it expires by itself (inactive_threshold)
                        log.debug("replay_consumer_delete_failed", consumer=name, error=str(exc))

    async def _pull_all(self, puller: Puller, rng: SeqRange, batch: int,
                        send: trio.MemorySendChannel[list[Journaled]]) -> None:
        """Pull until the range's last sequence, or until the consumer has nothing more (pending 0)."""
        failures = 0
        while True:
            try:
                raw, status = await self.conn.bridge.run(lambda: puller.next(batch, PULL_TIMEOUT))
                if status not in ("", "404", "408"):
                    raise RuntimeError(f"the journal answered a pull with status {status}")
                if not raw and not status:
                    raise TimeoutError(f"no answer to a pull within {PULL_TIMEOUT}s")
                failures = 0
            except Exception as exc:  # NATS reconnecting: the ephemeral consumer outlives a short outage
                failures += 1
                if failures >= FETCH_ATTEMPTS:
                    raise
                log.warning("replay_fetch_retry", namespace=self.namespace, error=f"{type(exc).__name__}: {exc}")
                await trio.sleep(min(5.0, 0.2 * 2**failures))
                continue
            if not raw:
                return  # nothing more stored: the range ends in sequences of other subjects (or deleted ones)
            out = []
            for reply, data in raw:
                seq, _, time_ns = parse_reply(reply)
                if seq <= rng.last:
                    out.extend(_decoded(seq, time_ns, data))
            if out:
                await send.send(out)
            last = raw[-1][0]
            if parse_reply(last)[0] >= rng.last or pending_of(last) == 0:
                return


class Puller:
    """No-wait pull requests to one consumer, answered on a private inbox: a batch per crossing.

    Lives on the NATS thread. Deliveries are collected below nats-py's per-message API
    (`fastpath.route`, as the journal writer does for its acks): nats-py's `fetch` costs a
    task switch and a timeout per message, ~10x slower here. Deliveries carry their stream
    subject, so they are kept in arrival order whichever pull asked for them (nothing is lost
    if a pull timed out); the status that ends a pull comes on that pull's own reply subject."""

    def __init__(self, nc: Any, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.pulls = 0
        self.current = ""
        self.sub: Any = None
        self.messages: list[tuple[str, bytes]] = []
        self.want = 0
        self.status = ""
        self.done: asyncio.Event | None = None

    @classmethod
    async def open(cls, nc: Any, stream: str, consumer: str) -> Puller:
        puller = cls(nc, stream, consumer)
        if fastpath.supported(nc):
            puller.sub = await nc.subscribe(f"{puller.inbox}.*")
            fastpath.route(nc, puller.sub._id, puller._on_raw)
        else:
            async def on_message(msg: Any) -> None:
                status = (msg.headers or {}).get("Status", "") if not msg.reply else ""
                puller._arrived(msg.subject, msg.reply, msg.data, status)

            puller.sub = await nc.subscribe(f"{puller.inbox}.*", cb=on_message)
        return puller

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = headers[9:12].decode() if not reply and headers and headers.startswith(b"NATS/1.0 ") else ""
        self._arrived(subject.decode(), reply.decode(), data, status)

    def _arrived(self, subject: str, reply: str, data: bytes, status: str) -> None:
        if reply:
            self.messages.append((reply, data))
            if self.done is not None and len(self.messages) >= self.want:
                self.done.set()
        elif subject == self.current and status != "100" and self.done is not None:
            self.status = status or "unknown"  # 404 no messages, 408 expired, 409 ...: this pull is over
            self.done.set()

    async def next(self, batch: int, timeout: float) -> tuple[list[tuple[str, bytes]], str]:
        """The messages available now (about `batch`), and the status that ended the pull ("" if none)."""
        self.status = ""
        if len(self.messages) < batch:
            self.pulls += 1
            self.current = f"{self.inbox}.{self.pulls}"
            self.want, self.done = batch, asyncio.Event()
            request = json.dumps({"batch": batch - len(self.messages), "no_wait": True}).encode()
            await self.nc.publish(self.subject, request, reply=self.current)
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                pass
            self.done = None
        messages, self.messages = self.messages, []
        return messages, self.status

    async def close(self) -> None:
        if fastpath.supported(self.nc) and self.sub is not None:
            fastpath.unroute(self.nc, self.sub._id)
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:  # gone with the connection
                pass


def pending_of(reply: str) -> int:
    """Messages left for the consumer after this one, from a `$JS.ACK...` reply subject."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def _decoded(seq: int, time_ns: int, data: bytes) -> list[Journaled]:
    """A message's entries: one, or a pack's (all at its sequence, each of another key)."""
    try:
        entries = decode_message(data)
    except msgspec.DecodeError as exc:
        return [Journaled(seq, time_ns, None, f"undecodable entry: {exc}")]
    for entry in entries:
        entry.seq = seq
    return [Journaled(seq, time_ns, entry) for entry in entries]


def _value(bound: SeqBound | TimeBound) -> int:
    return bound.seq if isinstance(bound, SeqBound) else bound.ns
