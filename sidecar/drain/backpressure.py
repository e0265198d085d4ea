"""Backpressure towards a target: an adaptive concurrency limit and a circuit breaker.

AdaptiveLimit is AIMD in the spirit of Netflix's concurrency-limits: the number of
runs in flight to a target grows by one after each round that finished fast and
clean, and shrinks by a quarter after a round with errors or a latency well above
the best recently seen. A slow or struggling database therefore gets less
concurrent load, not more retries.

CircuitBreaker stops applying after sustained failure (consecutive failed rounds,
or the target unreachable), probes the target's health with growing intervals, and
lets one trial round through (half-open) before closing again.
"""

from __future__ import annotations

import math
from enum import StrEnum

import trio


class AdaptiveLimit:
    def __init__(self, initial: int = 128, minimum: int = 4, maximum: int = 4096) -> None:
        self.limit = initial
        self.minimum = minimum
        self.maximum = maximum
        self.in_use = 0
        self.best_latency = math.inf
        self._freed = trio.Event()

    async def acquire(self, wanted: int) -> int:
        """Take up to `wanted` slots (at least one); waits while the limit is used up."""
        while self.in_use >= self.limit:
            await self._freed.wait()
        granted = max(1, min(wanted, self.limit - self.in_use))
        self.in_use += granted
        return granted

    def release(self, count: int, latency: float, failed: bool) -> None:
        self.in_use -= count
        # The baseline drifts up slowly so a permanently slower target is not punished forever.
        self.best_latency = min(self.best_latency * 1.01, latency) if self.best_latency < math.inf else latency
        if failed or latency > 4 * self.best_latency + 0.005:
            self.limit = max(self.minimum, int(self.limit * 0.75))
        elif latency <= 2 * self.best_latency + 0.002:
            self.limit = min(self.maximum, self.limit + 1)
        self._freed.set()
        self._freed = trio.Event()


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(self, failure_rounds: int = 5, probe_initial: float = 0.5, probe_max: float = 5.0) -> None:
        self.failure_rounds = failure_rounds
        self.probe_initial = probe_initial
        self.probe_max = probe_max
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.last_error = ""
        self.opened_at = 0.0
        self._changed = trio.Event()
        self._trial_taken = False

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if state == BreakerState.OPEN:
                self.opened_at = trio.current_time()
            self._trial_taken = False
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until_usable(self) -> None:
        """Return when a round may be applied: closed, or the one trial round of half-open."""
        while True:
            if self.state == BreakerState.CLOSED:
                return
            if self.state == BreakerState.HALF_OPEN and not self._trial_taken:
                self._trial_taken = True
                return
            await self._changed.wait()

    def record(self, succeeded: bool, unavailable: bool, error: str = "") -> None:
        """Outcome of one round: succeeded means at least part of it landed."""
        if succeeded:
            self.consecutive_failures = 0
            self._set(BreakerState.CLOSED)
            return
        self.last_error = error or self.last_error
        self.consecutive_failures += 1
        if self.state == BreakerState.HALF_OPEN or unavailable or self.consecutive_failures >= self.failure_rounds:
            self._set(BreakerState.OPEN)

    def probe_succeeded(self) -> None:
        if self.state == BreakerState.OPEN:
            self._set(BreakerState.HALF_OPEN)

    def next_probe_delay(self, attempt: int) -> float:
        return min(self.probe_max, self.probe_initial * (2 ** attempt))
