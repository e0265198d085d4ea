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
import asyncio
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tomli_w  # noqa: E402
from cassandra.auth import PlainTextAuthProvider  # noqa: E402
from cassandra.cluster import Cluster, Session  # noqa: E402
from cassandra.concurrent import execute_concurrent_with_args  # noqa: E402
from cassandra.policies import DCAwareRoundRobinPolicy  # noqa: E402

from tests.support.services import ensure_up  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## CQL front"
KEYSPACE = "walcar_bench_cql"
SEED_ROWS = 20_000
VALUE = b"v" * 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_walcar(workdir: Path, nats_url: str, cassandra: str, namespace: str) -> tuple[subprocess.Popen, int, str]:
    """`walcar run`; if it cannot serve cql listeners yet, bench/cql/front.py (same server code)."""
    port = free_port()
    document = {
        "sidecar": {"nats_url": nats_url, "admin": f"127.0.0.1:{free_port()}", "shutdown_grace": "0s",
                    "shutdown_deadline": "10s", "log_level": "warning"},
        "listeners": [{"protocol": "cql", "bind": f"127.0.0.1:{port}", "namespace": namespace}],
        "namespaces": {namespace: {"partitions": 16, "replay_window": "1h",
                                   "targets": [{"name": "db", "type": "cassandra", "contact_points": [cassandra],
                                                "keyspace": KEYSPACE}]}},
    }
    path = workdir / "walcar.toml"
    path.write_text(tomli_w.dumps(document))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for how, command in (
        ("walcar run --role ingress",
         [sys.executable, "-m", "sidecar.cli", "run", "--config", str(path), "--role", "ingress"]),
        ("bench/cql/front.py (walcar run has no cql listener yet)",
         [sys.executable, str(ROOT / "bench" / "cql" / "front.py"), str(path)]),
    ):
        log = open(workdir / "walcar.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_port(port, proc=proc)
            return proc, port, how
        except (RuntimeError, TimeoutError):
            stop(proc)
    raise RuntimeError(f"walcar did not start:\n{(workdir / 'walcar.log').read_text()[-3000:]}")


def delete_stream(nats_url: str, namespace: str) -> None:
    import nats

    async def run() -> None:
        nc = await nats.connect(nats_url)
        try:
            for name in (f"WAL_{namespace.upper()}", f"WAL_{namespace.upper()}_DLQ", f"OBJ_walchunks_{namespace}"):
                try:
                    await nc.jetstream().delete_stream(name)
                except Exception:  # not there: nothing to clean
                    pass
        finally:
            await nc.close()

    asyncio.run(run())


def connect(port: int, keyspace: str | None = KEYSPACE) -> tuple[Cluster, Session]:
    cluster = Cluster(["127.0.0.1"], port=port, protocol_version=4, compression=True,
                      auth_provider=PlainTextAuthProvider("cassandra", "cassandra"),
                      load_balancing_policy=DCAwareRoundRobinPolicy(local_dc="datacenter1"))
    return cluster, cluster.connect(keyspace)


def seed(session: Session) -> None:
    session.execute(f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
                    "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.kv (k bigint PRIMARY KEY, v blob)")
    insert = session.prepare(f"INSERT INTO {KEYSPACE}.kv (k, v) VALUES (?, ?)")
    execute_concurrent_with_args(session, insert, [(k, VALUE) for k in range(SEED_ROWS)], concurrency=128,
                                 raise_on_first_error=True)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000


@dataclass
class Side:
    name: str
    insert: list[float] = field(default_factory=list)
    select: list[float] = field(default_factory=list)
    # CPU µs per operation: this driver process, and (walcar side) the walcar process
    client_cpu: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "select": []})
    walcar_cpu: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "select": []})
    insert_latency: tuple[float, float] = (0.0, 0.0)
    select_latency: tuple[float, float] = (0.0, 0.0)


def markdown(direct: Side, walcar: Side, args: argparse.Namespace, how: str) -> str:
    def row(kind: str, d: Side, w: Side) -> str:
        dv, wv = max(getattr(d, kind)), max(getattr(w, kind))
        dl, wl = getattr(d, f"{kind}_latency"), getattr(w, f"{kind}_latency")
        return (f"| {kind}s | {dv:,.0f} | {wv:,.0f} | {ratio(d, w, kind):.2f}x | {wv / dv:.2f}x "
                f"| {dl[0]:.2f} / {dl[1]:.2f} | {wl[0]:.2f} / {wl[1]:.2f} |")

    rounds = ", ".join(f"{d:,.0f}/{w:,.0f}" for d, w in zip(direct.insert, walcar.insert, strict=True))
    select_rounds = ", ".join(f"{d:,.0f}/{w:,.0f}" for d, w in zip(direct.select, walcar.select, strict=True))
    return "\n".join([
        SECTION,
        "",
        f"`python bench/cql/run.py --ops {args.ops} --concurrency {args.concurrency} --rounds {args.rounds} "
        f"--rate {args.rate}` on {platform.machine()} with {os.cpu_count()} CPUs "
        f"({time.strftime('%Y-%m-%d')}); walcar ran as {how}.",
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
        f"{median(walcar.walcar_cpu['select']):.0f} µs per forwarded select.",
    ])


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def ratio(direct: Side, walcar: Side, kind: str) -> float:
    """Median of walcar/direct per round: each round ran both back to back, under the same background load."""
    ratios = sorted(w / d for d, w in zip(getattr(direct, kind), getattr(walcar, kind), strict=True))
    return ratios[len(ratios) // 2]


def record(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


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
        proc, port, how = start_walcar(Path(tmp), services.nats_url, f"{host}:{cport}", namespace)
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
                        client_before, walcar_before = time.process_time(), process_cpu(proc.pid)
                        rate = throughput(session, kind, args.ops, args.concurrency, offset)
                        side.client_cpu[kind].append((time.process_time() - client_before) / args.ops * 1e6)
                        side.walcar_cpu[kind].append((process_cpu(proc.pid) - walcar_before) / args.ops * 1e6)
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
            stop(proc)
            delete_stream(services.nats_url, namespace)
    section = markdown(direct, walcar, args, how)
    print()
    print(section)
    if args.record:
        record(section)
        print(f"recorded in {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
