"""The memcached front's own counters, and the `stats` answer that merges them with memcached's.

A client's `stats` sees memcached's fields (relayed from the backend, so existing
dashboards keep working) followed by ``walcar_*`` fields: what the journal acked,
refused or lost track of, and what this front did with writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sidecar import __version__
from sidecar.ingress import JournalStats

from .codec import encode_stats

__all__ = ["FrontStats", "LogThrottle", "stats_report"]


class FrontStats:
    """Counters of one memcached listener (all its connections)."""

    __slots__ = (
        "backend_errors",
        "busy",
        "conditional_applied",
        "conditional_unjournaled",
        "curr_connections",
        "noreply_failed",
        "total_connections",
        "writes_direct",
        "writes_failed",
        "writes_stored",
    )

    def __init__(self) -> None:
        self.writes_stored = 0  # unconditional writes journaled durably and answered as such
        self.writes_direct = 0  # unconditional writes sent straight to memcached (mode = "off")
        self.writes_failed = 0  # unconditional writes answered SERVER_ERROR (journal not durable)
        self.noreply_failed = 0  # of those, noreply writes: the client was told nothing
        self.conditional_applied = 0  # conditional ops applied to memcached and journaled
        self.conditional_unjournaled = 0  # applied to memcached, journal write failed
        self.busy = 0  # conditional ops refused: earlier writes to the key not applied yet
        self.backend_errors = 0  # requests answered SERVER_ERROR because memcached failed
        self.curr_connections = 0
        self.total_connections = 0


class LogThrottle:
    """At most one log line per interval for an event that can repeat per request (a journal
    outage fails every write); the counters in `stats` keep the exact numbers."""

    __slots__ = ("_interval", "_next", "suppressed")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self.suppressed = 0

    def allow(self) -> bool:
        """True when this occurrence should be logged; `suppressed` then says how many were not."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


def walcar_fields(front: FrontStats, journal: JournalStats, memcached_up: bool) -> list[tuple[str, object]]:
    return [
        ("walcar_version", __version__),
        ("walcar_memcached_up", int(memcached_up)),
        ("walcar_journal_acked", journal.acked),
        ("walcar_journal_failed", journal.failed),
        ("walcar_journal_unknown", journal.unknown),
        ("walcar_journal_shed", journal.shed),
        ("walcar_journal_duplicates", journal.duplicates),
        ("walcar_journal_inflight", journal.inflight_entries),
        ("walcar_journal_inflight_bytes", journal.inflight_bytes),
        ("walcar_journal_ack_latency_us", int(journal.last_ack_latency * 1e6)),
        ("walcar_writes_stored", front.writes_stored),
        ("walcar_writes_direct", front.writes_direct),
        ("walcar_writes_failed", front.writes_failed),
        ("walcar_noreply_failed", front.noreply_failed),
        ("walcar_conditional_applied", front.conditional_applied),
        ("walcar_conditional_unjournaled", front.conditional_unjournaled),
        ("walcar_conditional_busy", front.busy),
        ("walcar_backend_errors", front.backend_errors),
        ("walcar_curr_connections", front.curr_connections),
        ("walcar_total_connections", front.total_connections),
    ]


def stats_report(
    memcached: Iterable[tuple[bytes, bytes]], front: FrontStats, journal: JournalStats, memcached_up: bool
) -> bytes:
    """memcached's STAT lines, then walcar's, then END."""
    pairs: list[tuple[str | bytes, object]] = list(memcached)
    pairs.extend(walcar_fields(front, journal, memcached_up))
    return encode_stats(pairs)
