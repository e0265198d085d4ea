"""Nothing acked expires unseen: entries nearing the journal's max age (the namespace's replay window).

JetStream deletes an entry `replay_window` after it was stored, applied or not. An entry a
target could not take in time (down, paused, failing for most of the window) would vanish
without a trace; instead, past EXPIRE_FRACTION of the window it is dead-lettered with the
reason `expiring before applied`, so it can be replayed once the target is back. Past
AT_RISK_FRACTION the drain status says `at-risk` (and the oldest-unapplied metric over the
window is what the alert rule watches; docs/operations.md).

The partition worker checks what it holds; while it fetches nothing (paused, breaker open)
it peeks at the stored time of the next entry it has not fetched, and fetches (within its
byte budget) when that one is at risk, so entries still in the stream are seen too.
"""

from __future__ import annotations

from datetime import datetime

from sidecar.drain.nats import JetStreamApi
from sidecar.log.connection import JetStreamApiError

EXPIRE_FRACTION = 0.8  # of the replay window: dead-letter un-applied entries older than this
AT_RISK_FRACTION = 0.5  # of the replay window: the status shows `at-risk`
REASON = "expiring before applied"
ERROR_CLASS = "expiring"


def parse_time(text: str) -> float:
    """A JetStream time (RFC 3339 with nanoseconds; Python takes microseconds) as unix seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


async def first_stored_time(api: JetStreamApi, stream: str, subject: str, from_seq: int) -> float:
    """When the first entry on `subject` at or after `from_seq` was stored (unix seconds), 0.0 for none."""
    try:
        reply = await api.js_api(f"STREAM.MSG.GET.{stream}", {"seq": max(1, from_seq), "next_by_subj": subject})
    except JetStreamApiError:
        return 0.0
    return parse_time(reply["message"]["time"])


def check_interval(replay_window: float) -> float:
    """How often a worker looks for entries at risk: often enough to act well within the last
    fifth of the window, rarely for long windows."""
    return min(5.0, max(0.2, replay_window * 0.02))


def expiry_message(age: float, replay_window: float, last_error: str) -> str:
    cause = f"; last error: {last_error}" if last_error else ""
    return (f"{REASON}: stored {age:.0f}s ago, the journal keeps entries for {replay_window:g}s "
            f"(replay_window){cause}")
