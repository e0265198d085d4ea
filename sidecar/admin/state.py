"""What readiness is made of: startup finished, the journal's connection, every listener bound, not shutting down."""

from __future__ import annotations

from sidecar.log.connection import NatsConnection
from sidecar.log.writer import JournalWriter


class SidecarState:
    def __init__(self) -> None:
        self.conn: NatsConnection | None = None
        self.writer: JournalWriter | None = None
        self.listeners_expected: set[str] = set()
        self.listeners_bound: set[str] = set()
        self.shutting_down = False
        # Set once the drain service, the status poller and the listeners are up: a drain-only
        # process has no listener to wait for, yet is not serving until its drainers run.
        self.started = False

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if self.conn is None:
            reasons.append("journal not open yet")
        elif not self.started:
            reasons.append("starting (drain, status, listeners)")
        elif not self.conn.connected:
            reasons.append(f"journal disconnected from NATS ({self.conn.last_error or 'reconnecting'})")
        elif self.writer is not None and not self.writer.connected:
            reasons.append(f"journal publish link down ({self.writer.link_error or 'reconnecting'})")
        missing = sorted(self.listeners_expected - self.listeners_bound)
        if missing:
            reasons.append(f"listeners not bound: {', '.join(missing)}")
        return reasons
