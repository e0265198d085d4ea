"""Prometheus metrics, collected at scrape time from the counters the hot paths already keep.

The journal and the drain count in plain attributes (an integer add per event);
prometheus-client only sees them when /metrics is scraped, through one custom
collector. Nothing on a write's path takes a lock for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from sidecar.admin.status import StatusPoller
    from sidecar.admin.view import SidecarView

class SidecarCollector:
    def __init__(self, sidecar: SidecarView, poller: StatusPoller | None) -> None:
        self.sidecar = sidecar
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        yield from self._writes()
        yield from self._journal()
        yield from self._fronts()
        yield from self._overlay()
        yield from self._drain()
        yield from self._control()

    def _control(self) -> Iterator[Metric]:
        live = self.sidecar.live
        if live is None:
            return
        revision = GaugeMetricFamily("walcar_config_revision", "Bucket revision of each namespace in force "
                                     "(0: the config file's)", labels=["namespace"])
        for name in sorted(self.sidecar.config.namespaces):
            revision.add_metric([name], live.source(name)[1])
        yield revision
        yield CounterMetricFamily("walcar_config_apply_errors", "Namespace documents refused (invalid or unsafe) "
                                  "or failed to apply", value=live.apply_errors)
        yield GaugeMetricFamily("walcar_config_stale", "1 while the namespace bucket cannot be followed",
                                value=int(live.stale_since is not None))

    def _writes(self) -> Iterator[Metric]:
        ingress = self.sidecar.ingress
        if ingress is None:
            return
        counters = ingress.counters
        writes = CounterMetricFamily("walcar_writes", "Mutations received, by journal result "
                                     "(durable true/false/unknown)", labels=["namespace", "protocol", "op", "durable"])
        for labels, value in sorted(counters.writes.items()):
            writes.add_metric(list(labels), value)
        yield writes
        latency = HistogramMetricFamily("walcar_journal_ack_seconds", "Time from a write entering the journal "
                                        "writer to its PubAck (or failure)", labels=["namespace"])
        for namespace, histogram in sorted(counters.ack_latency.items()):
            latency.add_metric([namespace], histogram.cumulative(), histogram.sum)
        yield latency

    def _journal(self) -> Iterator[Metric]:
        ingress = self.sidecar.ingress
        if ingress is None:
            return
        stats = ingress.journal.writer.stats
        yield GaugeMetricFamily("walcar_journal_inflight_bytes", "Journal bytes awaiting their PubAck",
                                value=stats.inflight_bytes)
        yield GaugeMetricFamily("walcar_journal_inflight_entries", "Journal entries awaiting their PubAck",
                                value=stats.inflight_entries)
        yield CounterMetricFamily("walcar_journal_shed", "Writes refused at once because the journal was down "
                                  "or overloaded", value=stats.shed)
        connected = self.sidecar.state.conn is not None and self.sidecar.state.conn.connected
        yield GaugeMetricFamily("walcar_journal_connected", "1 while connected to NATS", value=int(connected))

    def _overlay(self) -> Iterator[Metric]:
        ingress = self.sidecar.ingress
        if ingress is None:
            return
        size = GaugeMetricFamily("walcar_overlay_bytes", "Bytes the read-your-writes overlay holds (acked writes "
                                 "the primary target has not applied; overlay_budget)", labels=["namespace"])
        evicted = CounterMetricFamily("walcar_overlay_evictions", "Overlay slots dropped to stay within "
                                      "overlay_budget", labels=["namespace"])
        fallback = CounterMetricFamily("walcar_overlay_fallback_reads", "Reads of an evicted key: waited up to "
                                       "visibility_budget for the drain, then read the target", labels=["namespace"])
        for name, overlay in sorted(ingress.overlays.namespaces.items()):
            size.add_metric([name], overlay.bytes)
            evicted.add_metric([name], overlay.evictions)
            fallback.add_metric([name], overlay.fallback_reads)
        yield from (size, evicted, fallback)
        yield GaugeMetricFamily("walcar_unapplied_keys_bytes", "Bytes spent remembering keys this sidecar journaled "
                                "and a target has not applied (sidecar.unapplied_budget)", value=ingress.applied.bytes)
        yield CounterMetricFamily("walcar_unapplied_keys_forgotten", "Keys forgotten to stay within "
                                  "sidecar.unapplied_budget (a conditional op on one does not wait for it)",
                                  value=ingress.applied.forgotten)

    def _fronts(self) -> Iterator[Metric]:
        ingress = self.sidecar.ingress
        if ingress is None:
            return
        labels = ["protocol", "bind"]
        active = GaugeMetricFamily("walcar_front_connections", "Connections a listener serves", labels=labels)
        cap = GaugeMetricFamily("walcar_front_connection_limit", "The listener's connection cap (max_connections, "
                                "within the descriptor limit)", labels=labels)
        refused = CounterMetricFamily("walcar_front_connections_refused", "Connections closed at once: the "
                                      "listener was at its cap", labels=labels)
        idle = CounterMetricFamily("walcar_front_idle_closed", "Connections closed after idle_timeout", labels=labels)
        partial = GaugeMetricFamily("walcar_front_partial_bytes", "Bytes of partly received requests held "
                                    "(memcached: partial_budget)", labels=labels)
        starved = CounterMetricFamily("walcar_front_partial_refused", "Requests refused for want of room in "
                                      "partial_budget", labels=labels)
        for bind, gate in sorted(ingress.connection_gates.items()):
            key = [gate.protocol, bind]
            active.add_metric(key, gate.active)
            cap.add_metric(key, gate.limit)
            refused.add_metric(key, gate.refused)
            idle.add_metric(key, gate.idle_closed)
            if gate.budget is not None:
                partial.add_metric(key, gate.budget.used)
                starved.add_metric(key, gate.budget.refused)
        yield from (active, cap, refused, idle, partial, starved)

    def _drain(self) -> Iterator[Metric]:
        labels = ["namespace", "target"]
        backlog = GaugeMetricFamily("walcar_drain_backlog",
                                    "Journal messages (an entry or a pack) not yet applied (consumer pending)",
                                    labels=labels)
        oldest = GaugeMetricFamily("walcar_drain_oldest_unapplied_seconds", "Age of the oldest unapplied entry",
                                   labels=labels)
        rate = GaugeMetricFamily("walcar_drain_apply_rate", "Journal messages applied per second (all drainers)",
                                 labels=labels)
        dlq = GaugeMetricFamily("walcar_dlq_depth", "Dead letters waiting", labels=labels)
        window = GaugeMetricFamily("walcar_drain_replay_window_seconds", "The journal's max age (the namespace's "
                                   "replay_window): un-applied entries are dead-lettered at 0.8 of it", labels=labels)
        at_risk = GaugeMetricFamily("walcar_drain_at_risk", "1 while the oldest un-applied entry is older than half "
                                    "the replay window", labels=labels)
        if self.poller is not None:
            for row in self.poller.polled_rows():
                key = [row.namespace, row.target]
                backlog.add_metric(key, row.backlog)
                oldest.add_metric(key, row.oldest_age_s)
                rate.add_metric(key, row.rate)
                dlq.add_metric(key, row.dlq)
                window.add_metric(key, self.sidecar.config.namespaces[row.namespace].replay_window)
                at_risk.add_metric(key, int(row.state == "at-risk"))
        yield from (backlog, oldest, rate, dlq, window, at_risk)
        drain = self.sidecar.drain
        if drain is None:
            return
        applied = CounterMetricFamily("walcar_drain_applied", "Entries this process applied", labels=labels)
        retries = CounterMetricFamily("walcar_drain_retries", "Transient apply failures retried", labels=labels)
        dead = CounterMetricFamily("walcar_drain_dead_lettered", "Entries sent to the DLQ", labels=labels)
        latency = GaugeMetricFamily("walcar_drain_apply_latency_seconds", "Smoothed latency of one target call",
                                    labels=labels)
        limit = GaugeMetricFamily("walcar_drain_concurrency_limit", "Adaptive limit of runs in flight", labels=labels)
        breaker = GaugeMetricFamily("walcar_drain_breaker_open", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                    labels=labels)
        owned = GaugeMetricFamily("walcar_drain_partitions_owned", "Partitions this process drains", labels=labels)
        states = {"closed": 0, "half-open": 1, "open": 2}
        for drainer in drain.drainers:
            key = [drainer.namespace, drainer.name]
            applied.add_metric(key, drainer.stats.applied)
            retries.add_metric(key, drainer.stats.retries)
            dead.add_metric(key, drainer.stats.dead_lettered)
            latency.add_metric(key, drainer.stats.latency)
            limit.add_metric(key, drainer.limiter.limit)
            breaker.add_metric(key, states[drainer.breaker.state.value])
            owned.add_metric(key, sum(1 for lease in drain.held.values() if lease.drainer is drainer))
        yield from (applied, retries, dead, latency, limit, breaker, owned)


def render(sidecar: SidecarView, poller: StatusPoller | None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(sidecar, poller))
    return generate_latest(registry)
