"""CQL front benchmark: cassandra-driver against Cassandra directly and through a real `walcar run`.

    python bench/cql/run.py [--ops 10000] [--concurrency 64] [--clients 1,2] [--rounds 5] [--record]

Both sides use the same driver settings (protocol v4, lz4, prepared statements):
(a) direct to the shared Cassandra, (b) through a `walcar run` whose CQL listener
journals to the shared nats-server and reads from that same Cassandra. Each round
runs, for (a) then (b): `execute_concurrent_with_args` inserts (journaled by walcar,
acked after the JetStream PubAck) and point selects of rows seeded directly in
Cassandra; the ratio reported is the median of the rounds' walcar/direct ratios.
Throughput runs once per client count: N driver processes (each its own Cluster and
`execute_concurrent`, the ops split between them). One Python driver process is bound
by its own GIL (~175 µs of CPU per insert on the reference box), so with one client both
sides mostly measure the driver; with two the box's CPUs run out and the comparison is
what the server side costs per operation, as it is for a fleet of app processes.
Latency (p50/p99) is measured separately at a fixed rate (default 1000 ops/s) with
one request timed per call. With --record the
results replace the "CQL front" section of docs/benchmarks.md.

No drain runs: walcar's inserts are only journaled. This is a benchmark, not a test:
numbers depend on the box, and the driver, walcar, nats-server and Cassandra share
its CPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cassandra.cluster import Cluster, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy

from bench.common import (
    SidecarProcess,
    cassandra_cluster,
    client_gc_off,
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
                                load_balancing=DCAwareRoundRobinPolicy(local_dc="datacenter1"))
    return cluster, cluster.connect(keyspace)


def seed(session: Session) -> None:
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.kv (k bigint PRIMARY KEY, v blob)")
    insert = session.prepare(f"INSERT INTO {KEYSPACE}.kv (k, v) VALUES (?, ?)")
    execute_concurrent_with_args(session, insert, [(k, VALUE) for k in range(SEED_ROWS)], concurrency=128,
                                 raise_on_first_error=True)


def throughput(session: Session, kind: str, ops: int, concurrency: int, offset: int) -> None:
    """execute_concurrent_with_args; inserts use fresh keys, selects hit seeded rows."""
    if kind == "insert":
        statement = session.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
        params = [(offset + i, VALUE) for i in range(ops)]
    else:
        statement = session.prepare("SELECT v FROM kv WHERE k = ?")
        params = [((offset + i) % SEED_ROWS,) for i in range(ops)]
    results = execute_concurrent_with_args(session, statement, params, concurrency=concurrency,
                                           raise_on_first_error=True)
    assert len(results) == ops
    if kind == "select":
        assert results[0].result_or_exc.one().v == VALUE


def client(jobs: Connection, ports: dict[str, int]) -> None:
    """One driver process: a session per side, then throughput jobs until told to stop.

    Each job answers (start, end, CPU seconds) so the parent can sum the clients."""
    sessions = {side: connect(port)[1] for side, port in ports.items()}
    jobs.send("ready")
    while (job := jobs.recv()) is not None:
        side, kind, ops, concurrency, offset = job
        cpu, started = time.process_time(), time.perf_counter()
        throughput(sessions[side], kind, ops, concurrency, offset)
        jobs.send((started, time.perf_counter(), time.process_time() - cpu))
    os._exit(0)  # the driver's threads would hold a normal exit up


class Clients:
    """N driver processes, started once and kept for every round."""

    def __init__(self, count: int, ports: dict[str, int]) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(count):
            parent, child = spawn.Pipe()
            proc = spawn.Process(target=client, args=(child, ports), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        for pipe in self.pipes:
            assert pipe.recv() == "ready"

    def run(self, side: str, kind: str, ops: int, concurrency: int, offset: int) -> tuple[float, float, float]:
        """ops/s of all clients together (first start to last end), their CPU seconds, and the wall time."""
        share = ops // len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send((side, kind, share, concurrency, offset + i * share))
        answers = [pipe.recv() for pipe in self.pipes]
        wall = max(a[1] for a in answers) - min(a[0] for a in answers)
        return share * len(self.pipes) / wall, sum(a[2] for a in answers), wall

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(10)


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

    with client_gc_off():
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


Run = tuple[str, int]  # (insert or select, number of client processes)


@dataclass
class Side:
    name: str
    rates: dict[Run, list[float]] = field(default_factory=dict)
    # CPU µs per operation: the driver processes, and (walcar side) the walcar process
    client_cpu: dict[Run, list[float]] = field(default_factory=dict)
    walcar_cpu: dict[Run, list[float]] = field(default_factory=dict)
    # CPUs of the box left idle during the run: near 0 means CPU-bound, more means waiting on latency
    idle_cpus: dict[Run, list[float]] = field(default_factory=dict)
    insert_latency: tuple[float, float] = (0.0, 0.0)
    select_latency: tuple[float, float] = (0.0, 0.0)


def markdown(direct: Side, walcar: Side, args: argparse.Namespace) -> str:
    runs = list(direct.rates)

    def name(run: Run) -> str:
        kind, clients = run
        return f"{kind}s, {clients} client{'s' if clients > 1 else ''}"

    def row(run: Run) -> str:
        dv, wv = max(direct.rates[run]), max(walcar.rates[run])
        return f"| {name(run)} | {dv:,.0f} | {wv:,.0f} | {ratio(direct, walcar, run):.2f}x | {wv / dv:.2f}x |"

    def cpu_row(run: Run) -> str:
        return (f"| {name(run)} | {median(direct.client_cpu[run]):.0f} | {median(walcar.client_cpu[run]):.0f} "
                f"| {median(walcar.walcar_cpu[run]):.0f} | {median(direct.idle_cpus[run]):.2f} "
                f"| {median(walcar.idle_cpus[run]):.2f} |")

    def rounds(run: Run) -> str:
        pairs = zip(direct.rates[run], walcar.rates[run], strict=True)
        return f"{name(run)}: " + ", ".join(f"{d:,.0f}/{w:,.0f}" for d, w in pairs)

    (dil, dip), (wil, wip) = direct.insert_latency, walcar.insert_latency
    (dsl, dsp), (wsl, wsp) = direct.select_latency, walcar.select_latency
    return "\n".join([
        f"`python bench/cql/run.py --ops {args.ops} --concurrency {args.concurrency} --clients {args.clients} "
        f"--rounds {args.rounds} --rate {args.rate}` on {platform.machine()} with {os.cpu_count()} CPUs "
        f"({time.strftime('%Y-%m-%d')}); walcar ran as {WALCAR_HOW}.",
        "cassandra-driver (libev, protocol v4, lz4, prepared statements) with `execute_concurrent_with_args` "
        f"(concurrency {args.concurrency} per client process); direct = the shared Cassandra 5, walcar = its CQL "
        "listener journaling inserts to the shared nats-server (acked after the PubAck, no drain) and "
        "forwarding selects to the same Cassandra. Each round runs direct then walcar back to back "
        f"({args.ops} ops each, split between the client processes); the ratio is the median over "
        f"{args.rounds} rounds of walcar/direct within a round, which pairs runs made under the same "
        "background load. The driver processes, walcar, nats-server and Cassandra share the CPUs.",
        "",
        "| workload | direct ops/s (best) | walcar ops/s (best) | ratio (median of rounds) | ratio of bests |",
        "|---|---|---|---|---|",
        *(row(run) for run in runs),
        "",
        "Every round (direct/walcar ops/s): " + "; ".join(rounds(run) for run in runs) + ".",
        "",
        "CPU per operation in µs (median over rounds; steadier than rates on a shared box), and the box's "
        "CPUs left idle (near 0: CPU-bound; more: waiting on latency):",
        "",
        "| workload | driver, direct | driver, via walcar | walcar | idle CPUs, direct | idle CPUs, walcar |",
        "|---|---|---|---|---|---|",
        *(cpu_row(run) for run in runs),
        "",
        f"Latency, one client (its own cyclic GC off while it measures), at a fixed {args.rate} ops/s: "
        f"inserts p50 / p99 {dil:.2f} / {dip:.2f} ms direct, "
        f"{wil:.2f} / {wip:.2f} ms via walcar; selects {dsl:.2f} / {dsp:.2f} ms direct, "
        f"{wsl:.2f} / {wsp:.2f} ms via walcar.",
    ])


def ratio(direct: Side, walcar: Side, run: Run) -> float:
    """Median of walcar/direct per round: each round ran both back to back, under the same background load."""
    return median([w / d for d, w in zip(direct.rates[run], walcar.rates[run], strict=True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=10_000, help="operations per throughput run")
    parser.add_argument("--concurrency", type=int, default=64, help="execute_concurrent concurrency per client")
    parser.add_argument("--clients", default="1,2", help="client process counts to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=1000, help="offered ops/s for the latency runs")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()
    client_counts = [int(count) for count in args.clients.split(",")]

    services = ensure_up()
    host, cport = services.cassandra
    namespace = "benchcql" + uuid.uuid4().hex[:6]
    direct, walcar = Side("direct"), Side("walcar")
    with tempfile.TemporaryDirectory(prefix="walcar-bench-cql-") as tmp:
        walcar_proc, port = start_cql_walcar(Path(tmp), services.nats_url, f"{host}:{cport}", namespace)
        pid = walcar_proc.proc.pid
        clusters = []
        pools: dict[int, Clients] = {}
        try:
            dc, ds = connect(cport, None)
            clusters.append(dc)
            seed(ds)
            ds.set_keyspace(KEYSPACE)
            wc, ws = connect(port)
            clusters.append(wc)
            hosts = wc.metadata.all_hosts()
            assert len(hosts) == 1 and hosts[0].endpoint.port == port, hosts
            for count in client_counts:
                pools[count] = Clients(count, {"direct": cport, "walcar": port})
            offset = 10_000_000
            for _ in range(args.rounds):
                for count, pool in pools.items():
                    for side in (direct, walcar):
                        for kind in ("insert", "select"):
                            run = (kind, count)
                            walcar_before, idle_before = cpu_seconds([pid]), idle_seconds()
                            rate, client_cpu, wall = pool.run(side.name, kind, args.ops, args.concurrency, offset)
                            side.idle_cpus.setdefault(run, []).append((idle_seconds() - idle_before) / wall)
                            side.client_cpu.setdefault(run, []).append(client_cpu / args.ops * 1e6)
                            side.walcar_cpu.setdefault(run, []).append(
                                (cpu_seconds([pid]) - walcar_before) / args.ops * 1e6)
                            side.rates.setdefault(run, []).append(rate)
                            offset += args.ops
                            print(f"{side.name:7s} {kind:6s} {count} client(s) {rate:10,.0f} ops/s", flush=True)
            for side, session in ((direct, ds), (walcar, ws)):
                for kind in ("insert", "select"):
                    result = latency(session, kind, args.rate, args.latency_seconds, offset)
                    offset += int(args.rate * args.latency_seconds)
                    setattr(side, f"{kind}_latency", result)
                    print(f"{side.name:7s} {kind:6s} p50 {result[0]:.2f} ms  p99 {result[1]:.2f} ms", flush=True)
        finally:
            for pool in pools.values():
                pool.close()
            for cluster in clusters:
                cluster.shutdown()
            walcar_proc.stop()
            delete_streams(services.nats_url, namespace)
    report(SECTION, markdown(direct, walcar, args), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
