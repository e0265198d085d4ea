"""The one small interface every drain target implements.

A target applies *runs*: for each key in a round, that key's pending entries in
journal order. It applies a run in order and stops at the first failure, reporting
how many entries landed and why the next one did not. Errors come classified:

- TRANSIENT    retry this key with backoff (timeouts, overload); counts an attempt
- UNAVAILABLE  the target itself is down (connection refused, no host): feeds the
               circuit breaker and never dead-letters, however long it lasts
- PERMANENT    will never succeed as is (invalid value, schema mismatch): dead-letter
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sidecar.envelope import Entry


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    UNAVAILABLE = "unavailable"
    PERMANENT = "permanent"


class ApplyError(Exception):
    def __init__(self, error_class: ErrorClass, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        # Seconds the target asked us to wait (HTTP Retry-After): the retry comes no sooner.
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ApplyError({self.error_class.value}: {self.message})"


@dataclass(slots=True)
class RunOutcome:
    applied: int  # entries of the run that landed, from its start
    error: ApplyError | None = None  # why entry `applied` did not (None: the whole run landed)


class Target(Protocol):
    name: str
    # Optional: keyword arguments for the drain's AdaptiveLimit (keys in flight: initial, minimum, maximum).
    # The default suits a database, whose latency rises under load; a target that batches on its own (a
    # queue's producer) and whose latency is its batching window sets a high floor instead.
    # limits: dict[str, int]
    # Optional: rounds one partition may have in flight at once (default 1: a round starts when the last is
    # done). More suits a target whose call mostly waits on its own batching (a producer's linger and acks)
    # and that takes concurrent calls; a key is never in two rounds at once either way.
    # overlapping_rounds: int
    # Optional: True when the target keeps the order of a run across keys, as a producer to one log does. The
    # drain then hands it each partition in stream order: one run of many keys per round, no per-key lanes.
    # Cheaper per entry; a failing entry holds its whole partition back (retried, then dead-lettered), and
    # a retry applies again the entries after it in the run, which may have landed already.
    # ordered: bool

    async def start(self) -> None:
        """Connect (and create schema where the target owns it)."""

    async def close(self) -> None: ...

    def wants(self, entry: Entry) -> bool:
        """Whether this target applies the entry at all (others are acked without applying)."""

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        """Apply each run in order; runs are for distinct keys and may proceed concurrently."""

    async def health(self) -> None:
        """Return when the target answers; raise ApplyError otherwise (the breaker's probe)."""


def addressed_to(entry: Entry, target: str) -> bool:
    """An entry names its targets, or none for all of them."""
    return not entry.targets or target in entry.targets
