"""When a drain partition's pulls count its consumer as gone: failures for long, not a leader election."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.drain import consumer as consumer_module
from sidecar.drain.consumer import GONE_AFTER_SECONDS, PartitionConsumer

NO_RESPONDERS = b"NATS/1.0 503\r\n\r\n"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(consumer_module.time, "monotonic", lambda: now[0])
    return now


def consumer() -> PartitionConsumer:
    nats: Any = None
    return PartitionConsumer(nats, "WAL_NS", "cache", "wal.ns.0", 0, ack_wait=30.0, max_ack_pending=1000)


def test_a_burst_of_no_responders_while_a_leader_is_elected_is_not_gone(clock: list[float]) -> None:
    pulls = consumer()
    for _ in range(10):  # ten quick 503s: the consumer is between leaders
        pulls.failed(b"503", NO_RESPONDERS)
        clock[0] += 0.2
    assert not pulls.gone()
    pulls.answered()  # a leader answers (a delivery, an expiry, a limit): the count starts over
    clock[0] += GONE_AFTER_SECONDS
    pulls.failed(b"503", NO_RESPONDERS)
    assert not pulls.gone()


def test_pulls_failing_for_long_mean_the_consumer_is_gone(clock: list[float]) -> None:
    pulls = consumer()
    delays = []
    for _ in range(6):
        delays.append(pulls.failed(b"503", NO_RESPONDERS))
        clock[0] += delays[-1]
    assert delays == sorted(delays) and delays[0] < delays[-1] <= 5.0  # backing off, capped
    assert clock[0] - 1000.0 < GONE_AFTER_SECONDS and not pulls.gone()
    clock[0] = 1000.0 + GONE_AFTER_SECONDS
    assert pulls.gone()


class Link:
    """What a pull needs of the NATS link; `end_of_read` runs what waits for the end of a socket read."""

    connected = True
    max_payload = 1024 * 1024

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.on_lost: list[Any] = []
        self.on_connected: list[Any] = []
        self.waiting: list[Any] = []

    def publish(self, subject: str, payload: bytes, reply: str = "") -> bool:
        import json

        self.requests.append(json.loads(payload))
        return True

    def subscribe(self, subject: str, handler: Any) -> int:
        return 1

    def after_read(self, fn: Any) -> None:
        self.waiting.append(fn)

    def end_of_read(self) -> None:
        waiting, self.waiting = self.waiting, []
        for fn in waiting:
            fn()

    def call_later(self, delay: float, fn: Any) -> Any:
        return type("Timer", (), {"done": False, "cancel": lambda self: None})()


def test_a_pull_whose_deliveries_fill_max_bytes_exactly_is_over(clock: list[float]) -> None:
    """nats-server ends such a request with no status at all: the next one must go out anyway."""
    link = Link()
    pulls = consumer()
    delivered: list[Any] = []
    subject, data = b"wal.ns.0", b"x" * 250
    reply = b"$JS.ACK.WAL_NS.drain-cache-0.1.%d.%d.1765000000000000000.%d"
    size = len(subject) + len(reply % (10, 10, 90)) + len(data)  # as the server counts it
    pull = consumer_module._Pull(link, pulls, lambda one_large: (256, 3 * size))
    pulls.sink = delivered.extend
    pull.request()
    for seq in (10, 11, 12):
        pull._on_message(subject, reply % (seq, seq, 100 - seq), data, None)
    link.end_of_read()
    assert len(delivered) == 3 and len(link.requests) == 2  # the first request is over: a second went out
