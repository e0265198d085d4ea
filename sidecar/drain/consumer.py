"""One durable pull consumer per (namespace, target, partition), feeding a partition worker.

Deliveries are pushed, not polled: the consumer keeps one pull request outstanding,
each sized by what the worker says it can hold now (entries, and bytes: the request's
`max_bytes`, so the server itself never sends more than the worker's byte budget);
what one read of the socket brought reaches the worker as one batch.
Requests, deliveries, acks and +WPI all go over the sidecar's trio connection to NATS
(link.py): a delivery reaches its worker as it is read, with no thread in between.

Why a reset on takeover: JetStream redelivers a dead owner's unacked messages only
after their AckWait, while a new owner would meanwhile receive newer ones — a key's
entries would apply out of order. So the owner that takes a partition recreates
its consumer at the ack floor (the first unacked sequence): everything after the
floor comes again, in stream order. Entries past the floor that were acked out of
order are applied a second time, in order, which leaves every key at its last value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio

from sidecar.drain.nats import DrainLink, DrainNats
from sidecar.log.connection import JetStreamApiError
from sidecar.log.link import Timer, new_inbox, reply_status
from sidecar.log.streams import STREAM_NOT_FOUND

CONSUMER_NOT_FOUND = 10014
ACK = b"+ACK"
IN_PROGRESS = b"+WPI"
PULL_EXPIRES = 5.0  # a pull request's life; re-issued while credit remains
# A request answered at once with an error (stream or consumer deleted: 503 no responders, 404, 409
# consumer deleted) is asked again after a growing delay, not at once: at once it spun a CPU.
PULL_BACKOFF_FIRST = 0.1
PULL_BACKOFF_MAX = 5.0
# Pulls failing for this long in a row (and at least 3 of them) mean the consumer is gone, not between
# leaders: a replicated consumer answers 503 (no responders) for a moment while it elects one.
GONE_AFTER_SECONDS = 10.0
GONE_AFTER_PULLS = 3
CONSUMER_DELETED = b"Consumer Deleted"


class ConsumerGone(RuntimeError):
    """The partition's consumer (or its stream) is gone: the worker ends, and its partition is taken
    over again (the consumer recreated) once the stream is back."""


class Delivered(msgspec.Struct, gc=False):  # no cycles; untracked keeps the GC off the hot path
    seq: int
    reply: bytes  # the ack subject, kept as read: it only ever goes back on the wire
    data: bytes
    stored_ns: int = 0  # when the stream stored it (unix ns): its age decides when it nears expiry


def parse_reply(reply: str | bytes) -> tuple[int, int, int]:
    """(stream sequence, delivery count, timestamp ns) from a `$JS.ACK...` reply subject."""
    tokens: list[str] | list[bytes] = reply.split(b".") if isinstance(reply, bytes) else reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[4]), int(tokens[7])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>
    return int(tokens[7]), int(tokens[6]), int(tokens[9])


def consumer_name(target: str, partition: int) -> str:
    return f"drain-{target}-{partition}"


Sink = Callable[[list[Delivered]], None]
# What the worker can take now: (messages, bytes) for the next pull request; (0, 0) for nothing. Its argument
# says the last request ended at once because the next message is over its max_bytes: then the worker asks
# for that one message alone, with room for the largest message there can be.
Allowance = Callable[[bool], tuple[int, int]]
MAX_BYTES_EXCEEDED = b"Message Size Exceeds MaxBytes"


class PartitionConsumer:
    def __init__(self, nats: DrainNats, stream: str, target: str, subject: str, partition: int,
                 ack_wait: float, max_ack_pending: int, first_start: float | None = None,
                 recreating: dict[int, int] | None = None) -> None:
        self.nats = nats
        self.partition = partition
        # The target's partitions whose consumer was deleted and not created again (a create that failed):
        # partition -> the sequence to start from, which the deleted consumer's ack floor said.
        self.recreating = recreating if recreating is not None else {}
        self.stream = stream
        self.name = consumer_name(target, partition)
        self.subject = subject
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        # A target added live starts at this time (unix seconds) the first time it runs; None: oldest.
        self.first_start = first_start
        self.sink: Sink | None = None
        self._pull: _Pull | None = None
        self.failures = 0  # pull requests in a row answered at once with an error
        self.failing_since = 0.0  # monotonic time of the first of them
        self.failure = ""  # the last one's status and description
        # The connection went while a pull request was out: what the server had sent on its way is gone, and
        # JetStream would redeliver it only after AckWait, behind newer deliveries (which an older entry of a
        # key must not follow: a log target would never get it). No more pulls; the worker restarts from the
        # ack floor (service._supervise), where the lost deliveries come first again.
        self.deliveries_lost = False

    def answered(self) -> None:
        """The consumer answered as it does when it is there (a delivery, an expiry, a limit)."""
        self.failures = 0

    def gone(self) -> bool:
        """Its pulls have failed long enough that the consumer (or its stream) is gone."""
        return (self.failures >= GONE_AFTER_PULLS
                and time.monotonic() - self.failing_since >= GONE_AFTER_SECONDS)

    def failed(self, status: bytes, headers: bytes) -> float:
        """A pull request ended at once with an error: record why; how long to wait before the next."""
        if not self.failures:
            self.failing_since = time.monotonic()
        self.failures += 1
        description = headers.split(b"\r\n", 1)[0].decode(errors="replace").removeprefix("NATS/1.0").strip()
        self.failure = description or status.decode(errors="replace")
        return min(PULL_BACKOFF_MAX, PULL_BACKOFF_FIRST * 2 ** min(self.failures - 1, 16))

    def _config(self, start_seq: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "durable_name": self.name,
            "name": self.name,
            "filter_subject": self.subject,
            "ack_policy": "explicit",
            "ack_wait": int(self.ack_wait * 1e9),
            "max_ack_pending": self.max_ack_pending,
            "max_deliver": -1,
            "replay_policy": "instant",
            "deliver_policy": "all",
        }
        if start_seq > 1:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = start_seq
        elif self.first_start is not None:
            config["deliver_policy"] = "by_start_time"
            config["opt_start_time"] = datetime.fromtimestamp(self.first_start, UTC).isoformat().replace("+00:00", "Z")
        return config

    async def info(self) -> dict[str, Any] | None:
        try:
            return await self.nats.js_api(f"CONSUMER.INFO.{self.stream}.{self.name}")
        except JetStreamApiError as exc:
            if exc.err_code == CONSUMER_NOT_FOUND:
                return None
            raise

    async def take_over(self, sink: Sink, allowance: Allowance) -> int:
        """Recreate the consumer at its ack floor and start delivering to `sink`, as `allowance` says.

        Returns the first sequence it will deliver."""
        info = await self.info()
        start = self.recreating.get(self.partition, 1)
        # Shielded: cancelled between the two, the consumer and its ack floor would be gone, and the next
        # owner would start from the stream's first entry. A failed create leaves the floor in `recreating`
        # for this process's next attempt, unless the stream is gone (a new one starts from its beginning).
        with trio.CancelScope(shield=True):
            if info is not None:
                start = self.recreating[self.partition] = int(info["ack_floor"]["stream_seq"]) + 1
                await self.nats.js_api(f"CONSUMER.DELETE.{self.stream}.{self.name}")
            try:
                await self.nats.js_api(
                    f"CONSUMER.CREATE.{self.stream}.{self.name}",
                    {"stream_name": self.stream, "config": self._config(start), "action": "create"},
                )
            except JetStreamApiError as exc:
                if exc.err_code == STREAM_NOT_FOUND:
                    self.recreating.pop(self.partition, None)
                raise
            self.recreating.pop(self.partition, None)
        self.sink = sink
        assert self.nats.link is not None, "the drain needs the connection's link (open_journal opens it)"
        self._pull = _Pull(self.nats.link, self, allowance)
        return start

    def poke(self) -> None:
        """The worker has room again (or may fetch again): ask for more unless a request is out."""
        if self._pull is not None:
            self._pull.request()

    def signal(self, replies: list[bytes], body: bytes = ACK) -> None:
        """Ack (or +WPI) many deliveries at once; fire and forget, like JetStream acks (a lost
        one is redelivered after AckWait, and the worker skips what it already applied)."""
        link = self.nats.link
        if link is not None:
            link.publish_to_each(replies, body)

    async def unbind(self) -> None:
        self.sink = None
        pull, self._pull = self._pull, None
        if pull is not None:
            pull.close()


class _Pull:
    """Keeps at most one pull request outstanding, each as big as the worker's allowance; deliveries
    go to the sink."""

    def __init__(self, link: DrainLink, consumer: PartitionConsumer, allowance: Allowance) -> None:
        self.link = link
        self.consumer = consumer
        self.allowance = allowance
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{consumer.stream}.{consumer.name}"
        self.inbox = new_inbox()
        self.requested = 0  # messages of the outstanding request, not yet delivered
        self.delivered = 0  # messages the outstanding request brought so far
        self.bytes_left = 0  # of its max_bytes, as the server counts them (subject, reply, headers, payload)
        self.request_id = 0
        self.closed = False
        self.timers: list[Timer] = []
        self.read: list[Delivered] = []  # deliveries of the current read, handed over together after it
        self.not_before = 0.0  # monotonic time before which no request goes out (backing off after failures)
        self.one_large = False  # the next message is over the last request's max_bytes: ask for it alone
        self.sid = link.subscribe(self.inbox, self._on_message)
        link.on_lost.append(self._on_lost)
        link.on_connected.append(self.request)

    def request(self) -> None:
        if self.closed or self.requested or self.consumer.deliveries_lost or not self.link.connected \
                or time.monotonic() < self.not_before:
            return
        size, max_bytes = self.allowance(self.one_large)
        if size <= 0 or max_bytes <= 0:
            return
        self.one_large = False
        self.requested, self.delivered, self.bytes_left = size, 0, max_bytes
        self.request_id += 1
        body = json.dumps({"batch": size, "max_bytes": max_bytes, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        self.link.publish(self.subject, body, reply=self.inbox)
        # A request can vanish unanswered: if it neither delivers nor ends, ask again.
        request_id = self.request_id
        self._later(PULL_EXPIRES + 2.0, lambda: self._check(request_id, size))

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers = [t for t in self.timers if not t.done]  # keep only the pending ones
        self.timers.append(self.link.call_later(delay, fn))

    def _check(self, request_id: int, size: int) -> None:
        """Past its expiry the server has ended the request, whatever it brought: if no end reached us
        (a lost status), it is over."""
        if request_id == self.request_id and self.requested:
            self._end_request()

    def _end_request(self, again_after: float = 0.0) -> None:
        self.requested = 0
        if again_after:
            self._later(again_after, self.request)
        elif self.read:  # the worker counts what this read brought before it is asked for more
            self.link.after_read(self.request)
        else:
            self.request()

    def _on_lost(self, _reason: str) -> None:
        """The request went with the connection, and with it whatever it was bringing."""
        if self.requested:
            self.consumer.deliveries_lost = True
        self.requested = 0

    def _on_message(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if self.closed or self.consumer.deliveries_lost:  # the restart from the ack floor brings it again
            return
        if not reply and headers:
            status = reply_status(headers)
            if status == b"100":  # heartbeat
                return
            if status == b"409" and CONSUMER_DELETED not in headers:
                # Max bytes reached: the request is simply over (at once, if it brought anything).
                # Another server limit (e.g. max ack pending): ask again a little later.
                self.consumer.answered()
                over = MAX_BYTES_EXCEEDED in headers
                if over and not self.delivered:
                    self.one_large = True  # the next message alone is over max_bytes
                self._end_request(0.0 if over else 0.5)
            elif status == b"408" or self.delivered:  # expired, or over after bringing something
                self.consumer.answered()
                self._end_request()
            else:  # over at once, with nothing: the consumer or its stream is gone (or between leaders)
                delay = self.consumer.failed(status, headers)
                self.not_before = time.monotonic() + delay  # pokes from the worker wait for it too
                self._end_request(delay)
            return
        self.consumer.answered()
        seq, _, stored_ns = parse_reply(reply)
        self.requested = max(0, self.requested - 1)
        self.delivered += 1
        # A request whose max_bytes the deliveries fill exactly ends with no status at all (nats-server
        # 2.15): count the bytes as the server does, or the worker would wait on a request that is over.
        self.bytes_left -= len(subject) + len(reply) + len(data) + (len(headers) if headers else 0)
        if self.bytes_left <= 0:
            self.requested = 0
        if not self.read:
            self.link.after_read(self._hand_over)
        self.read.append(Delivered(seq, reply, data, stored_ns))
        if self.requested == 0:
            self.link.after_read(self.request)  # once the worker has counted what this read brought

    def _hand_over(self) -> None:
        read, self.read = self.read, []
        sink = self.consumer.sink
        if sink is not None and not self.closed:
            sink(read)

    def close(self) -> None:
        self.closed = True
        for timer in self.timers:
            timer.cancel()
        self.link.unsubscribe(self.sid)
        self.link.on_lost.remove(self._on_lost)
        self.link.on_connected.remove(self.request)
