"""CQL front benchmark: cassandra-driver against Cassandra directly and through a real `walcar run`.

    python bench/cql/run.py [--ops 10000] [--concurrency 64] [--rounds 5] [--record]

Both sides use the same driver settings (protocol v4, lz4, prepared statements):
(a) direct to the shared Cassandra, (b) through a `walcar run` whose CQL listener
journals to the shared nats-server and reads from that same Cassandra. Each round
runs, for (a) then (b): `execute_concurrent_with_args` inserts (journaled by walcar,
acked after the JetStream PubAck) and point selects of rows seeded directly in
Cassandra; the ratio reported is the median of the rounds' walcar/direct ratios.
Latency (p50/p99) is measured separately at a fixed rate (default 1000 ops/s) with
one request timed per call. With --record the
results replace the "CQL front" section of docs/benchmarks.md.

No drain runs: walcar's inserts are only journaled. This is a benchmark, not a test:
numbers depend on the box, and the driver, walcar, nats-server and Cassandra share
its CPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cassandra.cluster import Cluster, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy

from bench.common import (
    SidecarProcess,
    cassandra_cluster,
    cpu_seconds,
    delete_streams,
    free_port,
    idle_seconds,
    median,
    percentile,
    report,
    sidecar_document,
    start_walcar,
)
from tests.support.services import ensure_up

SECTION = "CQL front"
WALCAR_HOW = "walcar run --role ingress"
KEYSPACE = "walcar_bench_cql"
SEED_ROWS = 20_000
VALUE = b"v" * 100


def start_cql_walcar(workdir: Path, nats_url: str, cassandra: str, namespace: str) -> tuple[SidecarProcess, int]:
    """`walcar run --role ingress` with one CQL listener journaling to `namespace`, reading from `cassandra`."""
    port = free_port()
    document = sidecar_document(
        nats_url,
        {namespace: {"partitions": 16, "replay_window": "1h",
                     "targets": [{"name": "db", "type": "cassandra", "contact_points": [cassandra],
                                  "keyspace": KEYSPACE}]}},
        [{"protocol": "cql", "bind": f"127.0.0.1:{port}", "namespace": namespace}],
        log_level="warning",
    )
    return start_walcar(workdir, document), port


def connect(port: int, keyspace: str | None = KEYSPACE) -> tuple[Cluster, Session]:
    cluster = cassandra_cluster(port, compression=True,
                                load_balancing_policy=DCAwareRoundRobinPolicy(local_dc="datacenter1"))
    return cluster, cluster.connect(keyspace)


def seed(session: Session) -> None:
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.kv (k bigint PRIMARY KEY, v blob)")
    insert = session.prepare(f"INSERT INTO {KEYSPACE}.kv (k, v) VALUES (?, ?)")
    execute_concurrent_with_args(session, insert, [(k, VALUE) for k in range(SEED_ROWS)], concurrency=128,
                                 raise_on_first_error=True)


def throughput(session: Session, kind: str, ops: int, concurrency: int, offset: int) -> float:
    """ops/s of execute_concurrent_with_args; inserts use fresh keys, selects hit seeded rows."""
    if kind == "insert":
        statement = session.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
        params = [(offset + i, VALUE) for i in range(ops)]
    else:
        statement = session.prepare("SELECT v FROM kv WHERE k = ?")
        params = [((offset + i) % SEED_ROWS,) for i in range(ops)]
    started = time.perf_counter()
    results = execute_concurrent_with_args(session, statement, params, concurrency=concurrency,
                                           raise_on_first_error=True)
    elapsed = time.perf_counter() - started
    assert len(results) == ops
    if kind == "select":
        assert results[0].result_or_exc.one().v == VALUE
    return ops / elapsed


def latency(session: Session, kind: str, rate: int, seconds: float, offset: int) -> tuple[float, float]:
    """p50/p99 in ms at a fixed offered rate (open loop: requests are sent on schedule)."""
    if kind == "insert":
        statement = session.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
    else:
        statement = session.prepare("SELECT v FROM kv WHERE k = ?")
    total = int(rate * seconds)
    samples: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def finished(started: float) -> None:
        with lock:
            samples.append(time.perf_counter() - started)
            if len(samples) == total:
                done.set()

    begin = time.perf_counter()
    for i in range(total):
        due = begin + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        params = (offset + i, VALUE) if kind == "insert" else ((offset + i) % SEED_ROWS,)
        started = time.perf_counter()
        future = session.execute_async(statement, params)
        future.add_callbacks(lambda _, s=started: finished(s), lambda exc, s=started: finished(s))
    done.wait(60)
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


@dataclass
class Side:
    name: str
    insert: list[float] = field(default_factory=list)
    select: list[float] = field(default_factory=list)
    # CPU µs per operation: this driver process, and (walcar side) the walcar process
    client_cpu: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "select": []})
    walcar_cpu: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "select": []})
    # CPUs of the box left idle during the run: near 0 means CPU-bound, more means waiting on latency
    idle_cpus: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "select": []})
    insert_latency: tuple[float, float] = (0.0, 0.0)
    select_latency: tuple[float, float] = (0.0, 0.0)


def markdown(direct: Side, walcar: Side, args: argparse.Namespace) -> str:
    def row(kind: str, d: Side, w: Side) -> str:
        dv, wv = max(getattr(d, kind)), max(getattr(w, kind))
        dl, wl = getattr(d, f"{kind}_latency"), getattr(w, f"{kind}_latency")
        return (f"| {kind}s | {dv:,.0f} | {wv:,.0f} | {ratio(d, w, kind):.2f}x | {wv / dv:.2f}x "
                f"| {dl[0]:.2f} / {dl[1]:.2f} | {wl[0]:.2f} / {wl[1]:.2f} |")

    rounds = ", ".join(f"{d:,.0f}/{w:,.0f}" for d, w in zip(direct.insert, walcar.insert, strict=True))
    select_rounds = ", ".join(f"{d:,.0f}/{w:,.0f}" for d, w in zip(direct.select, walcar.select, strict=True))
    return "\n".join([
        f"`python bench/cql/run.py --ops {args.ops} --concurrency {args.concurrency} --rounds {args.rounds} "
        f"--rate {args.rate}` on {platform.machine()} with {os.cpu_count()} CPUs "
        f"({time.strftime('%Y-%m-%d')}); walcar ran as {WALCAR_HOW}.",
        "cassandra-driver (libev, protocol v4, lz4, prepared statements) with `execute_concurrent_with_args`; "
        "direct = the shared Cassandra 5, walcar = its CQL listener journaling inserts to the shared "
        "nats-server (acked after the PubAck, no drain) and forwarding selects to the same Cassandra. "
        f"Each round runs direct then walcar back to back ({args.ops} ops each); the ratio is the median over "
        f"{args.rounds} rounds of walcar/direct within a round, which pairs runs made under the same background "
        f"load. Latency: p50 / p99 in ms at a fixed {args.rate} ops/s. The driver, walcar, nats-server and "
        "Cassandra share the CPUs.",
        "",
        "| workload | direct ops/s (best) | walcar ops/s (best) | ratio (median of rounds) | ratio of bests "
        "| direct p50 / p99 ms | walcar p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
        row("insert", direct, walcar),
        row("select", direct, walcar),
        "",
        f"Every round (direct/walcar ops/s): inserts {rounds}; selects {select_rounds}.",
        "",
        "CPU per operation (median over rounds; steadier than rates on a shared box): the driver process "
        f"{median(direct.client_cpu['insert']):.0f} µs per insert direct vs "
        f"{median(walcar.client_cpu['insert']):.0f} µs via walcar, {median(direct.client_cpu['select']):.0f} vs "
        f"{median(walcar.client_cpu['select']):.0f} µs per select; the walcar process "
        f"{median(walcar.walcar_cpu['insert']):.0f} µs per journaled insert and "
        f"{median(walcar.walcar_cpu['select']):.0f} µs per forwarded select. CPUs of the box left idle "
        f"(median): inserts {median(direct.idle_cpus['insert']):.2f} direct vs "
        f"{median(walcar.idle_cpus['insert']):.2f} via walcar, selects {median(direct.idle_cpus['select']):.2f} vs "
        f"{median(walcar.idle_cpus['select']):.2f}.",
    ])


def ratio(direct: Side, walcar: Side, kind: str) -> float:
    """Median of walcar/direct per round: each round ran both back to back, under the same background load."""
    return median([w / d for d, w in zip(getattr(direct, kind), getattr(walcar, kind), strict=True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=10_000, help="operations per throughput run")
    parser.add_argument("--concurrency", type=int, default=64, help="execute_concurrent concurrency")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=1000, help="offered ops/s for the latency runs")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()

    services = ensure_up()
    host, cport = services.cassandra
    namespace = "benchcql" + uuid.uuid4().hex[:6]
    direct, walcar = Side("direct"), Side("walcar")
    with tempfile.TemporaryDirectory(prefix="walcar-bench-cql-") as tmp:
        walcar_proc, port = start_cql_walcar(Path(tmp), services.nats_url, f"{host}:{cport}", namespace)
        pid = walcar_proc.proc.pid
        clusters = []
        try:
            dc, ds = connect(cport, None)
            clusters.append(dc)
            seed(ds)
            ds.set_keyspace(KEYSPACE)
            wc, ws = connect(port)
            clusters.append(wc)
            hosts = wc.metadata.all_hosts()
            assert len(hosts) == 1 and hosts[0].endpoint.port == port, hosts
            offset = 10_000_000
            for _ in range(args.rounds):
                for side, session in ((direct, ds), (walcar, ws)):
                    for kind in ("insert", "select"):
                        client_before, walcar_before = time.process_time(), cpu_seconds([pid])
                        idle_before, wall_before = idle_seconds(), time.perf_counter()
                        rate = throughput(session, kind, args.ops, args.concurrency, offset)
                        elapsed = time.perf_counter() - wall_before
                        side.idle_cpus[kind].append((idle_seconds() - idle_before) / elapsed)
                        side.client_cpu[kind].append((time.process_time() - client_before) / args.ops * 1e6)
                        side.walcar_cpu[kind].append((cpu_seconds([pid]) - walcar_before) / args.ops * 1e6)
                        getattr(side, kind).append(rate)
                        offset += args.ops
                        print(f"{side.name:7s} {kind:6s} {rate:10,.0f} ops/s", flush=True)
            for side, session in ((direct, ds), (walcar, ws)):
                for kind in ("insert", "select"):
                    result = latency(session, kind, args.rate, args.latency_seconds, offset)
                    offset += int(args.rate * args.latency_seconds)
                    setattr(side, f"{kind}_latency", result)
                    print(f"{side.name:7s} {kind:6s} p50 {result[0]:.2f} ms  p99 {result[1]:.2f} ms", flush=True)
        finally:
            for cluster in clusters:
                cluster.shutdown()
            walcar_proc.stop()
            delete_streams(services.nats_url, namespace)
    report(SECTION, markdown(direct, walcar, args), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
