"""A one-way queue between the trio thread and the NATS thread that wakes the other side once per burst.

Every wake-up across threads is a syscall (a write to the receiving loop's self-pipe)
and a context switch. Items put while the receiver has not run yet ride along with
the wake-up already scheduled, so a busy sidecar pays one wake-up per burst of
batches, not per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, wake: Callable[[Callable[[], None]], None], deliver: Callable[[list[T]], None]) -> None:
        self._wake = wake  # schedules a call on the receiving thread (call_soon_threadsafe / run_sync_soon)
        self._deliver = deliver  # runs on the receiving thread with everything put since the last delivery
        self._items: deque[T] = deque()
        self._scheduled = False

    def put(self, item: T) -> None:
        """On the sending thread. The item is visible before the flag is read, so a drain that
        cleared the flag after our check still finds it (deque operations are atomic)."""
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._wake(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        items = []
        while self._items:
            items.append(self._items.popleft())
        if items:
            self._deliver(items)
