"""What a running replay shows (progress) and what it ends with (summary), as msgspec structs.

The CLI draws its progress bar from `ReplayProgress`; the admin endpoint encodes the
same struct in `GET /v1/drain`. Rate and ETA come from stream positions over the
last few seconds, so they follow the job's current speed (throttled, waiting, ...).
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

MAX_FAILURES_LISTED = 1000
MAX_PREFIXES = 20
EXAMPLES_PER_REASON = 5


class Failure(msgspec.Struct, kw_only=True):
    """An entry the replay could not apply; listed in the summary (replays never dead-letter)."""

    seq: int
    key: str
    item: str = ""
    op: str = ""
    error_class: str  # permanent | exhausted (transient, out of attempts) | payload | undecodable
    error: str


class ReplayProgress(msgspec.Struct, kw_only=True):
    id: str
    namespace: str
    target: str
    state: str = "planning"  # planning | scanning | applying | waiting | stopping | done | stopped | failed
    dry_run: bool = False
    last_value_only: bool = False
    from_seq: int = 0
    to_seq: int = 0
    position: int = 0  # last sequence read in the current phase
    checkpoint_seq: int = 0  # every entry up to here is applied (a resume starts after it)
    scanned: int = 0  # --last-value-only / verify: entries read by the first pass
    seen: int = 0  # entries read by the applying pass (after a MULTI is expanded)
    applied: int = 0
    excluded: int = 0  # dropped by an --exclude-* rule
    skipped: int = 0  # not for this target (addressed elsewhere, or an op it does not apply)
    superseded: int = 0  # --last-value-only: an older write of an item
    failed: int = 0
    retries: int = 0
    rate: float = 0.0  # stream entries per second, over the last seconds
    eta_s: float | None = None
    started_at: str = ""
    updated_at: str = ""
    message: str = ""  # why it waits, why it stopped

    @property
    def total(self) -> int:
        return max(0, self.to_seq - self.from_seq + 1)

    @property
    def fraction(self) -> float:
        if self.total == 0:
            return 1.0
        return min(1.0, max(0, self.position - self.from_seq + 1) / self.total)


class ReplaySummary(msgspec.Struct, kw_only=True):
    progress: ReplayProgress
    elapsed_s: float = 0.0
    by_op: dict[str, int] = {}
    by_prefix: dict[str, int] = {}
    excluded_by: dict[str, int] = {}
    excluded_examples: dict[str, list[str]] = {}
    skipped_by: dict[str, int] = {}
    first_time: str = ""  # stream time of the first / last entry applied (or, dry run, to apply)
    last_time: str = ""
    first_write_time: str = ""
    last_write_time: str = ""
    failures: list[Failure] = []
    failures_not_listed: int = 0
    checkpoint: str = ""


class RateMeter:
    """Positions per second over a sliding window."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def reset(self) -> None:
        self.samples.clear()

    def add(self, position: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, position))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, p0), (t1, p1) = self.samples[0], self.samples[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, remaining: int) -> float | None:
        rate = self.rate()
        return remaining / rate if rate > 0 else None
