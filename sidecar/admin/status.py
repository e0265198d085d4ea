"""Drain status per (namespace, target), from JetStream itself so any sidecar can answer for all.

Every few seconds the poller reads each partition consumer (pending, ack floor), the
oldest unapplied entry's time, and the DLQ's subjects. Backlog, oldest age and rate
are therefore global (every drainer's work); breaker state, last error and owned
partitions are this process's own.

It polls only while someone is looking (a status read or a metrics scrape in the last
minute): that is a few JetStream API calls per partition and target every two seconds,
and every app pod runs a sidecar — a fleet of idle ones would keep JetStream's API busy
for nobody. The first read after a quiet spell waits for a fresh poll.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec
import trio

from sidecar.config import Config, Target, stream_name
from sidecar.drain.consumer import consumer_name
from sidecar.drain.expiry import AT_RISK_FRACTION, first_stored_time
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.log.streams import dlq_stream_name
from sidecar.logs import get_logger

if TYPE_CHECKING:
    from sidecar.drain.pauses import Pauses
    from sidecar.drain.service import DrainService

log = get_logger("admin.status")

POLL_INTERVAL = 2.0
IDLE_AFTER = 60.0  # no reader for this long: stop polling until the next one
FRESH_WAIT = 5.0  # how long a reader waits for a fresh poll before taking what is known


class TargetStatus(msgspec.Struct, kw_only=True):
    namespace: str
    target: str
    type: str
    backlog: int = 0
    oldest_age_s: float = 0.0
    rate: float = 0.0
    # at-risk | draining | paused | breaker-open | breaker-half-open | idle | unknown
    state: str = "unknown"
    dlq: int = 0
    last_error: str = ""
    partitions: int = 0
    owned_here: int = 0
    updated_at: str = ""


class StatusPoller:
    def __init__(self, config: Config, conn: NatsConnection, pauses: Pauses | None,
                 drain: DrainService | None) -> None:
        self.config = config
        self.conn = conn
        self.pauses = pauses
        self.drain = drain
        # Every configured target has a row from the start, so a reader sees the whole table
        # (state "unknown") even before the first poll, or while NATS is away.
        self._rows: dict[tuple[str, str], TargetStatus] = {
            (name, target.name): self._blank(name, target) for name, ns in config.namespaces.items()
            for target in ns.targets}
        self._floors: dict[tuple[str, str, int], tuple[int, float]] = {}
        self._last_read = -math.inf
        self._polled_at = -math.inf
        self._wanted = trio.Event()  # a reader arrived while the poller was idle
        self._polled = trio.Event()  # a poll finished

    def _blank(self, namespace: str, target: Target) -> TargetStatus:
        return TargetStatus(namespace=namespace, target=target.name,
                            type=type(target).__name__.removesuffix("Target").lower(),
                            partitions=self.config.namespaces[namespace].partitions)

    def polled_rows(self) -> list[TargetStatus]:
        """Rows with numbers from JetStream: metrics export no made-up zeros."""
        return [row for row in self.rows() if row.updated_at]

    def rows(self) -> list[TargetStatus]:
        """What is known now, without waiting (call `current` first to keep the numbers fresh)."""
        return [self._annotate(row) for row in self._rows.values()]

    async def current(self) -> list[TargetStatus]:
        """The rows for a reader; marks the demand that keeps the poller going, and waits (briefly)
        for a fresh poll when the last one is older than two intervals."""
        now = trio.current_time()
        self._last_read = now
        if now - self._polled_at > 2 * POLL_INTERVAL:
            self._wanted.set()
            polled = self._polled
            with trio.move_on_after(FRESH_WAIT):
                await polled.wait()
        return self.rows()

    def _annotate(self, row: TargetStatus) -> TargetStatus:
        """Fold in this process's live view: pause, breaker, last error, owned partitions."""
        out = msgspec.structs.replace(row)
        drainer = self.drain.drainer(row.namespace, row.target) if self.drain is not None else None
        window = self.config.namespaces[row.namespace].replay_window
        if row.updated_at and row.oldest_age_s > AT_RISK_FRACTION * window:
            out.state = "at-risk"  # un-applied entries are nearing the journal's max age
        elif self.pauses is not None and self.pauses.is_paused(row.namespace, row.target):
            out.state = "paused"
        elif drainer is not None and drainer.state.startswith("breaker"):
            out.state = drainer.state
        elif not row.updated_at:
            out.state = "unknown"  # never polled: no backlog known yet
        else:
            out.state = "draining" if row.backlog else "idle"
        if drainer is not None and self.drain is not None:
            out.last_error = drainer.stats.last_error or drainer.breaker.last_error
            out.owned_here = sum(lease.drainer is drainer for lease in self.drain.held.values())
        return out

    async def run(self) -> None:
        while True:
            if trio.current_time() - self._last_read > IDLE_AFTER:
                await self._wanted.wait()
            try:
                await self.poll()
            except Exception as exc:  # NATS away: keep the last known numbers
                log.debug("status_poll_failed", error=f"{type(exc).__name__}: {exc}")
            self._polled_at = trio.current_time()
            self._polled.set()  # readers that arrived during the poll have their fresh numbers
            self._polled = trio.Event()
            self._wanted = trio.Event()
            with trio.move_on_after(POLL_INTERVAL):
                await self._wanted.wait()  # a reader finding stale numbers need not wait out the sleep

    async def poll(self) -> None:
        configured = {(name, t.name) for name, ns in self.config.namespaces.items() for t in ns.targets}
        for key in self._rows.keys() - configured:  # removed live by the control plane
            del self._rows[key]
        for name, ns in list(self.config.namespaces.items()):
            dlq_counts = await self._dlq_counts(name) if ns.dlq else {}
            for target in ns.targets:
                try:
                    row = await self._poll_target(name, target, dlq_counts)
                except Exception as exc:  # this target's numbers stay as last known; the rest go on
                    log.debug("status_poll_failed", namespace=name, target=target.name,
                              error=f"{type(exc).__name__}: {exc}")
                    continue
                self._rows[(name, target.name)] = row

    async def _poll_target(self, name: str, target: Target, dlq_counts: dict[str, int]) -> TargetStatus:
        row = self._blank(name, target)
        target_name = row.target
        oldest = 0.0
        for partition in range(row.partitions):
            pending, first_time, rate = await self._partition(name, target_name, partition)
            row.backlog += pending
            row.rate += rate
            if first_time:
                oldest = max(oldest, time.time() - first_time)
        row.oldest_age_s = round(oldest, 3)
        row.rate = round(row.rate, 1)
        row.dlq = dlq_counts.get(target_name, 0)
        row.updated_at = datetime.now().astimezone().isoformat(timespec="seconds")
        return row

    async def _partition(self, namespace: str, target: str, partition: int) -> tuple[int, float, float]:
        """(pending entries, time of the oldest unapplied one or 0, entries/s since the last poll)."""
        stream = stream_name(namespace)
        subject = f"wal.{namespace}.{partition}"
        try:
            info = await self.conn.js_api(f"CONSUMER.INFO.{stream}.{consumer_name(target, partition)}")
        except JetStreamApiError:
            info = None
        if info is None:  # never drained yet: everything on the partition is pending
            state = (await self.conn.js_api(f"STREAM.INFO.{stream}", {"subjects_filter": subject}))["state"]
            pending = int((state.get("subjects") or {}).get(subject, 0))
            return pending, await first_stored_time(self.conn, stream, subject, 1) if pending else 0.0, 0.0
        pending = int(info.get("num_pending", 0)) + int(info.get("num_ack_pending", 0))
        floor = info.get("ack_floor") or {}
        acked = int(floor.get("consumer_seq", 0))
        now = time.monotonic()
        previous = self._floors.get((namespace, target, partition))
        self._floors[(namespace, target, partition)] = (acked, now)
        rate = 0.0
        if previous is not None and now > previous[1]:
            rate = max(0.0, (acked - previous[0]) / (now - previous[1]))
        first = await first_stored_time(self.conn, stream, subject,
                                                  int(floor.get("stream_seq", 0)) + 1) if pending else 0.0
        return pending, first, rate

    async def _dlq_counts(self, namespace: str) -> dict[str, int]:
        try:
            info = await self.conn.js_api(f"STREAM.INFO.{dlq_stream_name(namespace)}",
                                          {"subjects_filter": f"waldlq.{namespace}.>"})
        except JetStreamApiError:
            return {}
        counts: dict[str, int] = {}
        for subject, count in ((info.get("state") or {}).get("subjects") or {}).items():
            target = subject.split(".")[2]
            counts[target] = counts.get(target, 0) + int(count)
        return counts
