"""What a partition worker holds per delivered entry, and what holding it costs against the byte budget
(its constants are in memory_budget.py, which sums the worst case from them)."""

from __future__ import annotations

import msgspec

from sidecar.envelope import Entry, Op
from sidecar.memory_budget import ENTRY_OVERHEAD


class Held(msgspec.Struct, gc=False):
    """A delivered entry the worker holds until it is applied or dead-lettered (no cycles: untracked)."""

    seq: int
    reply: bytes
    data: bytes
    entry: Entry
    cost: int = 0  # bytes counted against the worker's budget (see `held_cost`)
    stored_at: float = 0.0  # unix seconds the stream stored it; it expires replay_window later
    attempts: int = 0
    first_failure: float = 0.0
    last_failure: float = 0.0
    last_error: str = ""


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
