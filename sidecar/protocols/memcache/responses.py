"""The answers of one memcached connection, in command order (filled in any order, sent in order),
and the per-connection bounds both ways of serving a connection (server.py, mux.py) keep."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

import trio

MAX_PENDING: Final = 4096  # answers a connection may owe before it stops reading
MAX_OUT_BYTES: Final = 8 * 1024 * 1024  # unsent answer bytes before it stops reading
RECEIVE: Final = 256 * 1024  # bytes taken from a client socket per read
# A data block at least this long is received only with room in the listener's partial_budget;
# smaller ones arrive within a read or two, and the connection cap bounds them.
LARGE_VALUE: Final = 64 * 1024


class Slot:
    __slots__ = ("data", "ready")

    def __init__(self) -> None:
        self.data = b""
        self.ready = False


class Responses:
    """Answers of one connection in command order; filled in any order, sent in order."""

    def __init__(self) -> None:
        self.slots: deque[Slot] = deque()
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.wake = trio.Event()
        self.space = trio.Event()
        self.closing = False  # everything up to the close point is queued: send it, then close
        self.sending = False  # a send_all is in progress (sender task or the reader's direct reply)
        self.notify: Callable[[], None] | None = None  # the multiplexer's, while it serves the connection
        self._close_slot: Slot | None = None

    @property
    def full(self) -> bool:
        return len(self.slots) >= MAX_PENDING or self.out_bytes >= MAX_OUT_BYTES

    def reserve(self) -> Slot:
        slot = Slot()
        self.slots.append(slot)
        return slot

    def fill(self, slot: Slot, data: bytes) -> None:
        slot.data = data
        slot.ready = True
        if self.slots and self.slots[0] is slot:
            self._advance()

    def answer(self, data: bytes) -> None:
        """An answer known now; still sent after everything owed before it."""
        if not self.slots:
            if data:
                self.out.append(data)
                self.out_bytes += len(data)
                self.wake.set()
                if self.notify is not None:
                    self.notify()
            return
        self.fill(self.reserve(), data)

    def close(self) -> None:
        """Close the connection once every answer owed so far is sent."""
        if self._close_slot is None:
            self._close_slot = self.reserve()
            self.fill(self._close_slot, b"")

    def _advance(self) -> None:
        slots = self.slots
        while slots and slots[0].ready:
            slot = slots.popleft()
            if slot.data:
                self.out.append(slot.data)
                self.out_bytes += len(slot.data)
            if slot is self._close_slot:
                self.closing = True
                slots.clear()
        self.wake.set()
        if self.notify is not None:
            self.notify()
        if not self.full:  # noreply answers are empty: room can come back without a send
            self.space.set()

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        self.out_bytes = 0
        return data

    def freed(self) -> None:
        if not self.full:
            self.space.set()
