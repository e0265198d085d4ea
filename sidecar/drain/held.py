"""What a partition worker holds per delivered entry, and what holding it costs against the byte budget
(its constants are in memory_budget.py, which sums the worst case from them)."""

from __future__ import annotations

import msgspec

from sidecar.envelope import Entry, Op
from sidecar.memory_budget import ENTRY_OVERHEAD

# The smallest an encoded entry can be (one-character id and namespace, an empty key: 48 bytes): a pack of
# entries brings at most one per MIN_ENTRY_BYTES of a pull's max_bytes, each costing ENTRY_OVERHEAD held.
MIN_ENTRY_BYTES = 48
PULL_COST_PER_BYTE = 2 + -(-ENTRY_OVERHEAD // MIN_ENTRY_BYTES)  # its bytes twice (message, decoded copy) + objects

# Where a held entry is: its message's stream sequence, or (sequence, index) for an entry of a pack.
Position = int | tuple[int, int]


class Pack:
    """A delivered pack (several entries in one message) whose entries are held: the message is acked,
    and its sequence announced, once every one of them is settled. Announced as dead-lettered (-seq)
    when any was: an applied notice says every key of its sequence is applied."""

    __slots__ = ("dead", "remaining", "reply")

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.remaining = 0
        self.dead = False

    def settle(self, seq: int, dead: bool) -> int:
        """One entry settled: 0 while others are held, else the sequence to announce (negative: some
        entry of it was dead-lettered)."""
        self.remaining -= 1
        self.dead = self.dead or dead
        if self.remaining:
            return 0
        return -seq if self.dead else seq


class Held(msgspec.Struct, gc=False):
    """A delivered entry the worker holds until it is applied or dead-lettered (no cycles: untracked)."""

    seq: int
    reply: bytes
    data: bytes  # its message, or for an entry of a pack, its own bytes in it
    entry: Entry
    cost: int = 0  # bytes counted against the worker's budget (see `held_cost`)
    stored_at: float = 0.0  # unix seconds the stream stored it; it expires replay_window later
    attempts: int = 0
    first_failure: float = 0.0
    last_failure: float = 0.0
    last_error: str = ""
    pos: Position = 0  # the worker sets it: `seq`, or (seq, index) in a pack
    pack: Pack | None = None


def chunk_bytes(entry: Entry) -> int:
    """The payload an entry's apply reads from the chunk store (a chunked value, a MULTI object)."""
    return entry.chunk.size if entry.chunk is not None else 0


def is_special(entry: Entry) -> bool:
    """An entry a run must look at on its own: its payload is in the chunk store, or it is a MULTI marker."""
    return entry.chunk is not None or entry.op is Op.MULTI


def held_cost(data: bytes, entry: Entry) -> int:
    """What holding an entry costs: its message and its decoded copy (values, CQL rows), plus what
    the apply will read from the chunk store for it."""
    return 2 * len(data) + chunk_bytes(entry) + ENTRY_OVERHEAD

