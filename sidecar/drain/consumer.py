"""One durable pull consumer per (namespace, target, partition), feeding a partition worker.

Deliveries are pushed, not polled: the worker grants credit (how many more entries
it can hold), the NATS thread keeps one pull request outstanding within that credit,
and everything that arrived for every partition crosses to trio together, once per
burst (handoff.py). Acks and +WPI go out the same way in the other direction. So a
busy drainer pays a few thread wake-ups per burst of rounds, not two per fetch.

Why a reset on takeover: JetStream redelivers a dead owner's unacked messages only
after their AckWait, while a new owner would meanwhile receive newer ones — a key's
entries would apply out of order. So the owner that takes a partition recreates
its consumer at the ack floor (the first unacked sequence): everything after the
floor comes again, in stream order. Entries past the floor that were acked out of
order are applied a second time, in order, which leaves every key at its last value.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors

from sidecar.log import fastpath
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.log.handoff import Handoff

CONSUMER_NOT_FOUND = 10014
ACK = b"+ACK"
IN_PROGRESS = b"+WPI"
PULL_EXPIRES = 5.0  # a pull request's life; re-issued while credit remains


@dataclass(slots=True)
class Delivered:
    seq: int
    reply: str
    data: bytes
    deliveries: int
    timestamp_ns: int


def parse_reply(reply: str) -> tuple[int, int, int]:
    """(stream sequence, delivery count, timestamp ns) from a `$JS.ACK...` reply subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[4]), int(tokens[7])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>
    return int(tokens[7]), int(tokens[6]), int(tokens[9])


def consumer_name(target: str, partition: int) -> str:
    return f"drain-{target}-{partition}"


Sink = Callable[[list[Delivered]], None]


class _Channel:
    """Per connection: deliveries to trio, credit grants to the NATS thread, each once per burst."""

    def __init__(self, conn: NatsConnection) -> None:
        self.deliveries: Handoff[tuple[PartitionConsumer, list[Delivered]]] = Handoff(conn.to_trio, self._deliver)
        self.grants: Handoff[tuple[_Pull, int]] = Handoff(conn.bridge.loop.call_soon_threadsafe, self._grant)

    @staticmethod
    def _deliver(items: list[tuple[PartitionConsumer, list[Delivered]]]) -> None:
        """On the trio thread: one call per consumer with everything it got in this burst."""
        grouped: dict[PartitionConsumer, list[Delivered]] = {}
        for consumer, delivered in items:
            grouped.setdefault(consumer, []).extend(delivered)
        for consumer, delivered in grouped.items():
            if consumer.sink is not None:
                consumer.sink(delivered)

    @staticmethod
    def _grant(items: list[tuple[_Pull, int]]) -> None:
        """On the NATS thread."""
        for pull, credit in items:
            pull.grant(credit)


_channels: weakref.WeakKeyDictionary[NatsConnection, _Channel] = weakref.WeakKeyDictionary()


def _channel(conn: NatsConnection) -> _Channel:
    channel = _channels.get(conn)
    if channel is None:
        channel = _channels[conn] = _Channel(conn)
    return channel


class PartitionConsumer:
    def __init__(self, conn: NatsConnection, stream: str, target: str, subject: str, partition: int,
                 ack_wait: float, max_ack_pending: int, fetch_batch: int = 256) -> None:
        self.conn = conn
        self.stream = stream
        self.name = consumer_name(target, partition)
        self.subject = subject
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.fetch_batch = fetch_batch
        self.sink: Sink | None = None
        self._pull: _Pull | None = None  # NATS thread only

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
        return config

    async def info(self) -> dict[str, Any] | None:
        try:
            return await self.conn.js_api(f"CONSUMER.INFO.{self.stream}.{self.name}")
        except JetStreamApiError as exc:
            if exc.err_code == CONSUMER_NOT_FOUND:
                return None
            raise

    async def take_over(self, sink: Sink) -> int:
        """Recreate the consumer at its ack floor and start delivering to `sink` (as credit allows).

        Returns the first sequence it will deliver."""
        info = await self.info()
        start = 1
        if info is not None:
            start = int(info["ack_floor"]["stream_seq"]) + 1
            await self.conn.js_api(f"CONSUMER.DELETE.{self.stream}.{self.name}")
        await self.conn.js_api(
            f"CONSUMER.CREATE.{self.stream}.{self.name}",
            {"stream_name": self.stream, "config": self._config(start), "action": "create"},
        )
        self.sink = sink
        channel = _channel(self.conn)
        nc = self.conn.nc
        assert nc is not None
        self._pull = await self.conn.bridge.run(
            lambda: _Pull.open(nc, self, channel, self.fetch_batch, fastpath.supported(nc))
        )
        return start

    def grant(self, credit: int) -> None:
        """The worker can hold `credit` more entries."""
        if credit > 0 and self._pull is not None:
            _channel(self.conn).grants.put((self._pull, credit))

    def signal(self, replies: list[str], body: bytes = ACK) -> None:
        """Ack (or +WPI) many deliveries at once; fire and forget, like JetStream acks."""
        if replies:
            self.conn.publish_soon([(reply, body) for reply in replies])

    async def unbind(self) -> None:
        self.sink = None
        pull, self._pull = self._pull, None
        if pull is not None:
            try:
                await self.conn.bridge.run(pull.close)
            except Exception:  # already gone with the connection
                pass


class _Pull:
    """Lives on the NATS thread: keeps one pull request outstanding within the granted credit.

    With nats-py's internals available, deliveries come straight from its parser
    (fastpath.route); otherwise a small fetch loop uses nats-py's public pull API."""

    def __init__(self, nc: Any, consumer: PartitionConsumer, channel: _Channel, batch: int) -> None:
        self.nc = nc
        self.consumer = consumer
        self.channel = channel
        self.batch = batch
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{consumer.stream}.{consumer.name}"
        self.inbox = nc.new_inbox()
        self.credit = 0
        self.requested = 0  # of the outstanding request, not yet delivered
        self.request_id = 0
        self.sub: Any = None
        self.closed = False
        self.fetcher: asyncio.Task[None] | None = None
        self.more = asyncio.Event()

    @classmethod
    async def open(cls, nc: Any, consumer: PartitionConsumer, channel: _Channel, batch: int, raw: bool) -> _Pull:
        pull = cls(nc, consumer, channel, batch)
        if raw:
            pull.sub = await nc.subscribe(pull.inbox)
            fastpath.route(nc, pull.sub._id, pull._on_message)
        else:
            pull.sub = await nc.jetstream().pull_subscribe_bind(consumer.name, stream=consumer.stream)
            pull.fetcher = asyncio.get_running_loop().create_task(pull._fetch_loop())
        return pull

    def grant(self, credit: int) -> None:
        self.credit += credit
        if self.fetcher is not None:
            self.more.set()
        else:
            self._request()

    def _request(self) -> None:
        if self.closed or self.requested or self.credit <= 0 or not self.nc.is_connected:
            return
        size = min(self.credit, self.batch)
        self.credit -= size
        self.requested = size
        self.request_id += 1
        body = json.dumps({"batch": size, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        command = fastpath.encode_publish(self.subject, self.inbox.encode(), None, body)
        asyncio.get_running_loop().create_task(fastpath.append_commands(self.nc, [command], len(command)))
        # A request can vanish (a reconnect in between): if it neither delivers nor ends, ask again.
        asyncio.get_running_loop().call_later(PULL_EXPIRES + 2.0, self._check, self.request_id, size)

    def _check(self, request_id: int, size: int) -> None:
        if request_id == self.request_id and self.requested == size:
            self._end_request()

    def _end_request(self) -> None:
        self.credit += self.requested  # what the request did not bring is credit again
        self.requested = 0
        self._request()

    def _on_message(self, _subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if not reply and headers and headers.startswith(b"NATS/1.0 "):
            status = headers[9:12]
            if status == b"409":  # a server limit (e.g. max ack pending): ask again a little later
                self.credit += self.requested
                self.requested = 0
                asyncio.get_running_loop().call_later(0.5, self._request)
            elif status != b"100":  # 404 no messages, 408 expired: the request is over
                self._end_request()
            return
        text = reply.decode()
        seq, deliveries, timestamp = parse_reply(text)
        self.requested = max(0, self.requested - 1)
        self.channel.deliveries.put((self.consumer, [Delivered(seq, text, data, deliveries, timestamp)]))
        if self.requested == 0:
            self._request()

    async def _fetch_loop(self) -> None:
        while not self.closed:
            if self.credit <= 0:
                self.more.clear()
                await self.more.wait()
                continue
            size = min(self.credit, self.batch)
            try:
                messages = await self.sub.fetch(size, timeout=PULL_EXPIRES)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception:  # disconnected: nats-py reconnects; try again shortly
                await asyncio.sleep(0.5)
                continue
            self.credit -= len(messages)
            delivered = []
            for msg in messages:
                seq, deliveries, timestamp = parse_reply(msg.reply)
                delivered.append(Delivered(seq, msg.reply, msg.data, deliveries, timestamp))
            if delivered:
                self.channel.deliveries.put((self.consumer, delivered))

    async def close(self) -> None:
        self.closed = True
        if self.fetcher is not None:
            self.fetcher.cancel()
        else:
            fastpath.unroute(self.nc, self.sub._id)
        await self.sub.unsubscribe()
