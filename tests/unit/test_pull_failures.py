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
