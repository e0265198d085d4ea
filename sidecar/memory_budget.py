"""The sidecar's worst-case memory, summed from its configuration, checked against its container's limit.

Every buffer, queue and cache has a byte budget; what they can hold at once, plus an idle
sidecar, is what the pod must have room for. `walcar run` refuses to start when that sum is over
the memory limit it runs under (the cgroup's `memory.max`, or `sidecar.memory_limit`), naming the
budgets to lower: better than an OOM kill under the first burst, with acked writes in flight.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.config import Config
from sidecar.config.targets import KafkaTarget

MiB = 1024 * 1024
# An idle sidecar's RSS (interpreter, trio, nats-py, the Cassandra and Kafka clients): ~75 MiB measured.
IDLE_BYTES = 80 * MiB
# What a connection holds uncharged: a request below the partial_budget threshold (LARGE_VALUE /
# LARGE_FRAME / LARGE_BODY: 64 KiB; a KV head up to h11's 64 KiB limit plus the 16 KiB read that
# crossed it) and the reads on their way in, in the copies trio and h11 make. A KV connection reads
# nothing beyond what its app asks for; with hypercorn (before 2026-12-07) one whose body waited
# for room held 81 KiB, measured with 200 waiting.
CONNECTION_BYTES = 96 * 1024
# nats-py's own outgoing buffer (the chunk store's and the control plane's connection).
NATS_CLIENT_PENDING = 8 * MiB
# The server's max_payload is not known before connecting: nats-server's default (1 MiB) is assumed. A
# server configured larger raises each drain partition's floor (docs/configuration.md, Memory).
ASSUMED_MAX_PAYLOAD = 1024 * 1024

# The drain's accounting (sidecar/drain: held.py, recent.py, service.py), here so the sum uses the same numbers.
# Python objects around one held entry (Held, Entry, lane slot, dict entries), counted per entry.
ENTRY_OVERHEAD = 1024
# Subject, reply subject and headers of a delivered message, over its payload (max_bytes counts them).
MESSAGE_ENVELOPE = 4096
# However small a worker's share of the budget, it has room for this many small entries besides.
MIN_BITE = 64
# The part of sidecar.drain.max_held_bytes the remembered keys take (drain/recent.py), the rest is held
# entries': 4 MiB of the default 32 MiB, ~24k keys of 50 characters.
RECENT_FRACTION = 8


def worker_floor(max_payload: int) -> int:
    """The least one drain partition worker holds room for, whatever its share of `max_held_bytes`: one
    largest message twice (the message and its decoded copy) and a bite of small ones. A pull request
    whose max_bytes is under the next message's size would end at once, again and again."""
    return 2 * (max_payload + MESSAGE_ENVELOPE) + MIN_BITE * ENTRY_OVERHEAD


def recent_share(max_held_bytes: int) -> int:
    """What every drain partition's remembered keys may take together."""
    return max_held_bytes // RECENT_FRACTION
CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
UNLIMITED = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def worst_case(config: Config, role: str) -> list[tuple[str, int]]:
    """What each budget can hold at once, as (the settings it comes from, bytes)."""
    rows = [("an idle sidecar", IDLE_BYTES), ("the NATS client's outgoing buffer", NATS_CLIENT_PENDING)]
    if role in ("ingress", "all"):
        for index, listener in enumerate(config.listeners):
            rows.append((f"listeners[{index}] ({listener.protocol}): partial_budget + max_connections x 96 KiB",
                         int(listener.partial_budget) + listener.max_connections * CONNECTION_BYTES))
        rows.append(("sidecar.journal.max_inflight_bytes", int(config.sidecar.journal.max_inflight_bytes)))
        rows.append(("sidecar.nats_max_pending", int(config.sidecar.nats_max_pending)))
        rows.append(("sidecar.unapplied_budget", int(config.sidecar.unapplied_budget)))
        for name, ns in config.namespaces.items():
            if ns.read_your_writes and ns.mode != "off":
                rows.append((f"namespaces.{name}.overlay_budget", int(ns.overlay_budget)))
    if role in ("drain", "all"):
        max_held = int(config.sidecar.drain.max_held_bytes)
        recent = recent_share(max_held)
        # Each partition worker of each target holds at least `worker_floor`, whatever its share: with
        # many partitions that, not the setting, bounds the drain (64 partitions: 133 MiB).
        workers = sum(ns.partitions for ns in config.namespaces.values() for _ in ns.targets)
        held = max(max_held - recent, workers * worker_floor(ASSUMED_MAX_PAYLOAD))
        # Measured (docs/benchmarks.md, Drain memory): 156 MiB peak draining, 64 MiB held, 48 MiB idle.
        floor = f", at least {worker_floor(ASSUMED_MAX_PAYLOAD) / MiB:.2f} MiB x {workers} partitions of targets"
        rows.append((f"sidecar.drain.max_held_bytes (7/8 held entries{floor if workers else ''}), and half again "
                     "for the apply path's copies", held * 3 // 2))
        rows.append(("sidecar.drain.max_held_bytes (1/8): the keys the drain remembers against redeliveries",
                     recent))
        for name, ns in config.namespaces.items():
            for target in ns.targets:
                if isinstance(target, KafkaTarget):
                    rows.append((f"namespaces.{name}.targets.{target.name}.max_buffer", int(target.max_buffer)))
    return rows


def container_limit() -> int | None:
    """The memory limit of the cgroup this process runs in; None when there is none."""
    for path in CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            return int(text)
        return None
    return None


def limit_of(config: Config) -> tuple[int | None, str]:
    """The limit to check against and where it comes from (`sidecar.memory_limit`: 0 = no check)."""
    configured = config.sidecar.memory_limit
    if configured is not None:
        return (int(configured) or None), "sidecar.memory_limit"
    return container_limit(), "the container's memory limit (cgroup memory.max)"


def refusal(config: Config, role: str) -> str | None:
    """Why this configuration may not start here, or None when its worst case fits."""
    limit, source = limit_of(config)
    if limit is None:
        return None
    rows = worst_case(config, role)
    total = sum(size for _, size in rows)
    if total <= limit:
        return None
    largest = sorted(rows[2:], key=lambda row: -row[1])[:4]
    return (f"worst-case memory {total / MiB:.0f} MiB is over {source} of {limit / MiB:.0f} MiB: lower "
            + "; ".join(f"{what} ({size / MiB:.0f} MiB)" for what, size in largest)
            + ", or raise the limit (walcar config check lists every budget; docs/configuration.md, Memory)")


def table(config: Config, role: str) -> str:
    rows = worst_case(config, role)
    lines = [f"  {size / MiB:8.1f} MiB  {what}" for what, size in rows]
    limit, source = limit_of(config)
    lines.append(f"  {sum(s for _, s in rows) / MiB:8.1f} MiB  worst case (role {role})"
                 + (f"; limit {limit / MiB:.0f} MiB from {source}" if limit else "; no memory limit here"))
    return "\n".join(lines)
