"""One durable pull consumer per (namespace, target, partition), driven from trio.

Each call crosses to the NATS thread once: a fetch brings a batch, acks and
in-progress signals for a whole round go out together.

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
from dataclasses import dataclass
from typing import Any

import nats.errors

from sidecar.log import fastpath
from sidecar.log.connection import JetStreamApiError, NatsConnection

CONSUMER_NOT_FOUND = 10014
ACK = b"+ACK"
IN_PROGRESS = b"+WPI"


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


class PartitionConsumer:
    def __init__(self, conn: NatsConnection, stream: str, target: str, subject: str, partition: int,
                 ack_wait: float, max_ack_pending: int) -> None:
        self.conn = conn
        self.stream = stream
        self.name = consumer_name(target, partition)
        self.subject = subject
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self._sub: Any = None  # nats-py pull subscription, when the fast path is unavailable (NATS thread only)
        self._pull: _RawPull | None = None

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

    async def take_over(self) -> int:
        """Recreate the consumer at its ack floor; returns the first sequence it will deliver."""
        info = await self.info()
        start = 1
        if info is not None:
            start = int(info["ack_floor"]["stream_seq"]) + 1
            await self.conn.js_api(f"CONSUMER.DELETE.{self.stream}.{self.name}")
        await self.conn.js_api(
            f"CONSUMER.CREATE.{self.stream}.{self.name}",
            {"stream_name": self.stream, "config": self._config(start), "action": "create"},
        )
        await self._bind()
        return start

    async def _bind(self) -> None:
        nc = self.conn.nc
        assert nc is not None
        if fastpath.supported(nc):
            self._pull = await self.conn.bridge.run(lambda: _RawPull.open(nc, self.stream, self.name))
            return

        async def bind() -> Any:
            return await nc.jetstream().pull_subscribe_bind(self.name, stream=self.stream)

        self._sub = await self.conn.bridge.run(bind)

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]:
        """Up to `batch` deliveries, as soon as any are there; [] after `timeout` without any."""
        pull = self._pull
        if pull is not None:
            return await self.conn.bridge.run(lambda: pull.fetch(batch, timeout))
        sub = self._sub

        async def fetch() -> list[Delivered]:
            try:
                messages = await sub.fetch(batch, timeout=timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                return []
            out = []
            for msg in messages:
                seq, deliveries, timestamp = parse_reply(msg.reply)
                out.append(Delivered(seq, msg.reply, msg.data, deliveries, timestamp))
            return out

        return await self.conn.bridge.run(fetch)

    def signal(self, replies: list[str], body: bytes = ACK) -> None:
        """Ack (or +WPI) many deliveries with one crossing; fire and forget, like JetStream acks."""
        if not replies:
            return
        nc = self.conn.nc
        if nc is None or not fastpath.supported(nc):
            async def publish_each() -> None:
                for reply in replies:
                    await nc.publish(reply, body)  # type: ignore[union-attr]

            self.conn.bridge.spawn(publish_each)
            return
        commands = [fastpath.encode_publish(reply, b"", None, body) for reply in replies]

        async def append() -> None:
            if nc.is_connected:
                await fastpath.append_commands(nc, commands, sum(len(c) for c in commands))

        self.conn.bridge.spawn(append)

    async def unbind(self) -> None:
        sub, self._sub = self._sub, None
        pull, self._pull = self._pull, None

        async def unsubscribe() -> None:
            try:
                if sub is not None:
                    await sub.unsubscribe()
                if pull is not None:
                    await pull.close()
            except Exception:  # already gone with the connection
                pass

        await self.conn.bridge.run(unsubscribe)


class _RawPull:
    """Pull requests on a private inbox, deliveries collected below nats-py's per-message API.

    nats-py's fetch costs a task switch and a uuid per message; here the parser hands
    each delivery straight to `_on_message`, and a fetch returns the whole burst that
    arrived. One pull request stays outstanding until the server fills or expires it;
    deliveries that land after a fetch returned wait in the buffer for the next one.
    Lives on the NATS thread.
    """

    def __init__(self, nc: Any, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.buffer: list[Delivered] = []
        self.outstanding = 0
        self.arrived = asyncio.Event()
        self.sub: Any = None

    @classmethod
    async def open(cls, nc: Any, stream: str, consumer: str) -> _RawPull:
        pull = cls(nc, stream, consumer)
        pull.sub = await nc.subscribe(pull.inbox)
        fastpath.route(nc, pull.sub._id, pull._on_message)
        return pull

    def _on_message(self, _subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if not reply and headers and headers.startswith(b"NATS/1.0 "):
            status = headers[9:12]
            if status != b"100":  # 404 no messages, 408 request expired, 409 limits: the request is over
                self.outstanding = 0
                self.arrived.set()
            return
        text = reply.decode()
        seq, deliveries, timestamp = parse_reply(text)
        self.buffer.append(Delivered(seq, text, data, deliveries, timestamp))
        self.outstanding = max(0, self.outstanding - 1)
        self.arrived.set()

    async def fetch(self, batch: int, timeout: float) -> list[Delivered]:
        if not self.buffer:
            if self.outstanding == 0:
                body = json.dumps({"batch": batch, "expires": int(timeout * 1e9)}).encode()
                await self.nc.publish(self.subject, body, reply=self.inbox)
                self.outstanding = batch
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout + 1.0)
            except TimeoutError:
                self.outstanding = 0  # the request's end was lost (e.g. a reconnect): ask again next time
            await asyncio.sleep(0)  # let the rest of the burst be parsed
        out, self.buffer = self.buffer[:batch], self.buffer[batch:]
        return out

    async def close(self) -> None:
        fastpath.unroute(self.nc, self.sub._id)
        await self.sub.unsubscribe()
