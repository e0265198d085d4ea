"""`--rate N`: at most N entries applied per second, so a replay cannot flatten a recovering database.

Sans-I/O token bucket without a burst: each batch reserves its entries and is told
how long to wait; the average rate is exact over any stretch longer than a batch.
"""

from __future__ import annotations


class Throttle:
    def __init__(self, rate: float) -> None:
        self.rate = rate  # entries per second; <= 0: unlimited
        self._next = 0.0  # when the next entry may go (monotonic seconds)

    def delay(self, entries: int, now: float) -> float:
        """Reserve `entries`; the seconds to wait before applying them."""
        if self.rate <= 0 or entries <= 0:
            return 0.0
        start = max(self._next, now)
        self._next = start + entries / self.rate
        return start - now

    def batch_size(self, largest: int) -> int:
        """Batches of about a quarter second at the set rate keep the throttle smooth."""
        if self.rate <= 0:
            return largest
        return max(1, min(largest, int(self.rate / 4)))
