"""Each key's last applied sequence, for as long as an older entry of it can still come back.

An entry applied but whose ack was lost is redelivered after AckWait. Applying it again would
put an older value back over a newer one on a target without write timestamps (memcached),
so the partition skips (and acks) any delivery not newer than its key's last apply. A key
has to be remembered only that long: two generations of plain dicts, the older dropped every
AckWait, keep each key for one to two AckWaits after its last apply. (An older entry that never
arrived, lost with the connection, is not skipped here behind a newer one: the worker restarts from
the ack floor then, `PartitionConsumer.deliveries_lost`.)

Memory is bounded in bytes for the whole process, not per partition: every partition worker
of the drain charges one `RecentBudget` (an eighth of `sidecar.drain.max_held_bytes`). A
worker that would go over it forgets its own older keys first, so a burst over many keys
shortens that partition's window instead of growing memory.
"""

from __future__ import annotations

import sys

# Besides the key's str object: its dict slot (amortised over the table's growth) and the int of its
# sequence. ~170 bytes measured (tracemalloc) for a 50-character key, 99 of them the str itself.
KEY_OVERHEAD = 80

class RecentBudget:
    """Bytes that every partition's remembered keys may take together."""

    __slots__ = ("total", "used")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0


class RecentlyApplied:
    def __init__(self, window: float, budget: RecentBudget) -> None:
        self.window = window
        self.budget = budget
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._current_bytes = 0
        self._previous_bytes = 0
        self._retire_at = 0.0

    def last(self, key: str) -> int:
        """The key's last applied sequence while remembered, else 0."""
        seq = self._current.get(key)
        return self._previous.get(key, 0) if seq is None else seq

    def remember(self, key: str, seq: int, now: float) -> None:
        if now >= self._retire_at:
            self.expire(now, force=True)
        current = self._current
        if key not in current:
            cost = sys.getsizeof(key) + KEY_OVERHEAD
            budget = self.budget
            # Over the process's total: forget this partition's older keys (at most two generations'
            # worth; what other partitions hold comes back as their generations retire).
            for _ in range(2):
                if budget.used + cost <= budget.total or not (self._previous or self._current):
                    break
                self._retire(now)
            current = self._current
            self._current_bytes += cost
            budget.used += cost
        current[key] = seq

    def expire(self, now: float, force: bool = False) -> None:
        """Retire a generation when one is due (also called while idle, so memory is given back)."""
        if force or now >= self._retire_at:
            self._retire(now)

    def _retire(self, now: float) -> None:
        self.budget.used -= self._previous_bytes
        self._previous, self._current = self._current, {}
        self._previous_bytes, self._current_bytes = self._current_bytes, 0
        self._retire_at = now + self.window

    def clear(self) -> None:
        """The worker is done with its partition: give everything back to the budget."""
        self.budget.used -= self._previous_bytes + self._current_bytes
        self._current, self._previous = {}, {}
        self._current_bytes = self._previous_bytes = 0

    @property
    def bytes(self) -> int:
        return self._current_bytes + self._previous_bytes

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
