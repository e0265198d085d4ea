"""Write counters the hot path keeps: plain integer adds, read by the admin layer at scrape time.

They live outside sidecar/admin so the ingress core does not depend on the outer admin
layer (admin reads these; nothing here knows about Prometheus).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """A fixed-bucket histogram cheap enough for every write (a bisect and two adds)."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class WriteCounters:
    """Writes by (namespace, protocol, op, durable result), and journal ack latency per namespace."""

    def __init__(self) -> None:
        self.writes: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.ack_latency: defaultdict[str, Histogram] = defaultdict(Histogram)

    def record(self, namespace: str, protocol: str, op: str, durable: str, seconds: float, count: int = 1) -> None:
        """`count` writes answered alike after `seconds` (the entries of one batch)."""
        self.writes[(namespace, protocol, op, durable)] += count
        self.ack_latency[namespace].observe(seconds, count)
