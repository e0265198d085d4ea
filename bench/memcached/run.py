"""memcached front benchmark: memaslap against memcached, twemproxy, and walcar journaling every write.

    python bench/memcached/run.py [--seconds 15] [--connections 32] [--record]

(a) memcached direct (the shared test memcached), (b) twemproxy (`nutcracker`) in front
of it, (c) a real `walcar run` with a memcached listener journaling to the shared
nats-server. Each gets memaslap set-only and 90/10 get/set; then a Python client
measures p50/p99 latency at a fixed 2k ops/s against (a) and (c). With --record the
results replace the "memcached front" section of docs/benchmarks.md.

No drain runs: walcar's sets are only journaled, so its gets miss in memcached
(memaslap's gets hit on (a) and (b)). This is a benchmark, not a test: numbers depend
on the box, and memaslap, the servers and walcar share its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    SidecarProcess,
    client_gc_off,
    cpu_seconds,
    delete_streams,
    free_port,
    percentile,
    pids_listening,
    report,
    sidecar_document,
    start_walcar,
    stop,
    wait_port,
)
from tests.support.services import ensure_up

MEMASLAP = shutil.which("memcaslap") or shutil.which("memaslap") or "/usr/bin/memcaslap"
NUTCRACKER = shutil.which("nutcracker") or "/usr/sbin/nutcracker"
KEY_SIZE = 32
VALUE_SIZE = 256
SECTION = "memcached front"
WALCAR_HOW = "walcar run"


# --------------------------------------------------------------------------- the three servers


def start_twemproxy(workdir: Path, memcached: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "nutcracker.yml"
    conf.write_text(
        "bench:\n"
        f"  listen: 127.0.0.1:{port}\n"
        "  hash: fnv1a_64\n  distribution: ketama\n  timeout: 1000\n  backlog: 1024\n"
        "  preconnect: true\n  auto_eject_hosts: false\n"
        f"  servers:\n   - {memcached}:1\n"
    )
    log = open(workdir / "nutcracker.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([NUTCRACKER, "-c", str(conf), "-s", str(free_port()), "-o", str(workdir / "nc.log")],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    return proc, port


def start_memcached_walcar(workdir: Path, nats_url: str, memcached: str, namespace: str,
                           io: str = "", journal: dict | None = None) -> tuple[SidecarProcess, int]:
    """`walcar run --role ingress` with one memcached listener journaling to `namespace`; `io="tasks"` runs
    its front with one task per connection, not the listener multiplexer (WALCAR_MEMCACHED_IO, mux.py);
    `journal`: [sidecar.journal] settings (pack_entries)."""
    port = free_port()
    document = sidecar_document(
        nats_url,
        # No drain runs here, so nothing would ever trim the read-your-writes overlay: it would fill to
        # its budget and every get of an evicted key would wait visibility_budget for an apply that never
        # comes. The front is measured without it; bench/overlay measures what it costs.
        {namespace: {"partitions": 16, "replay_window": "1h", "read_your_writes": False,
                     "targets": [{"name": "cache", "type": "memcached", "servers": [memcached]}]}},
        [{"protocol": "memcached", "bind": f"127.0.0.1:{port}", "namespace": namespace}],
        log_level="warning", **({"journal": journal} if journal else {}),
    )
    saved = os.environ.get("WALCAR_MEMCACHED_IO")
    os.environ["WALCAR_MEMCACHED_IO"] = io
    try:
        return start_walcar(workdir, document), port
    finally:
        if saved is None:
            del os.environ["WALCAR_MEMCACHED_IO"]
        else:
            os.environ["WALCAR_MEMCACHED_IO"] = saved


# --------------------------------------------------------------------------- memaslap


def memaslap(port: int, set_share: float, seconds: int, connections: int, workdir: Path) -> tuple[float, int]:
    cfg = workdir / f"memaslap-{set_share}.cfg"
    cfg.write_text(f"key\n{KEY_SIZE} {KEY_SIZE} 1\nvalue\n{VALUE_SIZE} {VALUE_SIZE} 1\n"
                   f"cmd\n0 {set_share}\n1 {1 - set_share:.2f}\n")
    command = [MEMASLAP, "-s", f"127.0.0.1:{port}", "-T", "2", "-c", str(connections), "-t", f"{seconds}s",
               "-F", str(cfg)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    match = re.search(r"Ops: (\d+) TPS: (\d+)", out)
    if match is None:
        raise RuntimeError(f"memaslap gave no TPS:\n{out[-2000:]}")
    return float(match.group(2)), int(match.group(1))


# --------------------------------------------------------------------------- fixed-rate latency


async def _latency(port: int, rate: int, seconds: float, workers: int, command: str) -> list[float]:
    """`workers` connections, each sending on its own fixed schedule (rate/workers per second);
    latency is from send to the complete answer, in seconds."""
    value = b"v" * VALUE_SIZE
    latencies: list[float] = []
    period = workers / rate

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        start = loop.time() + index / rate
        n = 0
        while (due := start + n * period) < start + seconds:
            key = f"lat-{index}-{n % 1000}".encode()
            if command == "set":
                request, end = b"set %b 0 0 %d\r\n%b\r\n" % (key, len(value), value), b"STORED\r\n"
            else:
                request, end = b"get %b\r\n" % key, b"END\r\n"
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.perf_counter()
            writer.write(request)
            data = b""
            while not data.endswith(end):
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            latencies.append(time.perf_counter() - began)
            if not data.endswith(end) or data.startswith(b"SERVER_ERROR"):
                raise RuntimeError(data[:200])
            n += 1
        writer.close()

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return latencies


def latency(port: int, command: str, seconds: float, rate: int = 2000, workers: int = 8) -> tuple[float, float, int]:
    with client_gc_off():
        values = asyncio.run(_latency(port, rate, seconds, workers, command))
    return percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3, len(values)


# --------------------------------------------------------------------------- main


@dataclass
class Results:
    tps: dict[tuple[str, str], float] = field(default_factory=dict)
    cpu: dict[tuple[str, str], float] = field(default_factory=dict)  # µs of CPU per op in the server processes
    lat: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average before and after


def markdown(results: Results, args: argparse.Namespace, command: str) -> str:
    t = results.tps
    lines = [
        f"Recorded {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}); memaslap, memcached, nutcracker, "
        "nats-server and walcar all share the box. 1-minute load average before/after the run: "
        + " / ".join(f"{x:.1f}" for x in results.load) + " (other work on the box included).",
        "",
        f"Command: `{command}`",
        "",
        f"memaslap: {args.connections} connections, 2 threads, {args.seconds} s per run, "
        f"{KEY_SIZE}-byte keys, {VALUE_SIZE}-byte values. walcar: `{WALCAR_HOW}`, one namespace, "
        "16 partitions, async mode, no drain, `read_your_writes = false` (its gets all miss: nothing "
        "reaches memcached without the drain).",
        "",
        "| workload | (a) memcached ops/s | (b) twemproxy ops/s | (c) walcar ops/s | (c)/(a) | (c)/(b) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for workload in ("set", "get90/set10"):
        a, b, c = t[("a", workload)], t.get(("b", workload), 0.0), t[("c", workload)]
        ratio_b = f"{c / b:.2f}" if b else "n/a"
        lines.append(f"| {workload} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {c / a:.2f} | {ratio_b} |")
    cpu = results.cpu
    lines += [
        "",
        "CPU per operation (user + system, µs) in the processes each request passes through — (a) memcached; "
        "(b) nutcracker + memcached; (c) walcar + nats-server (+ memcached for gets). Less sensitive to other "
        "load on the box than ops/s:",
        "",
        "| workload | (a) | (b) | (c) |",
        "|---|---:|---:|---:|",
    ]
    for workload in ("set", "get90/set10"):
        lines.append(f"| {workload} | {cpu[('a', workload)]:.1f} | {cpu[('b', workload)]:.1f} | "
                     f"{cpu[('c', workload)]:.1f} |")
    lines += [
        "",
        "Latency from a Python client (8 connections, fixed 2,000 ops/s in total, send to full answer; "
        "the client's own cyclic GC off while it measures):",
        "",
        "| command | (a) memcached p50 / p99 ms | (c) walcar p50 / p99 ms | added p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for command_name in ("set", "get"):
        a50, a99, _ = results.lat[("a", command_name)]
        c50, c99, _ = results.lat[("c", command_name)]
        lines.append(f"| {command_name} | {a50:.3f} / {a99:.3f} | {c50:.3f} / {c99:.3f} | {c99 - a99:+.3f} |")
    set_ratio = t[("c", "set")] / t[("b", "set")] if t.get(("b", "set")) else 0.0
    added_p99 = results.lat[("c", "set")][1] - results.lat[("a", "set")][1]
    cpu_ratio = cpu[("c", "set")] / cpu[("b", "set")] if cpu.get(("b", "set")) else 0.0
    lines += [
        "",
        f"Targets: (c) >= 0.5x (b) for sets — this run {set_ratio:.2f}x, "
        f"{'met' if set_ratio >= 0.5 else 'NOT met'}; added p99 <= 1 ms for sets — this run {added_p99:+.2f} ms, "
        f"{'met' if added_p99 <= 1.0 else 'NOT met'}; CPU per set (c) <= 3x (b) — this run {cpu_ratio:.1f}x, "
        f"{'met' if cpu_ratio <= 3.0 else 'NOT met'}.",
        "",
        "walcar's front reads every client socket of the listener from one task (the multiplexer, "
        "sidecar/protocols/memcache/mux.py, since 2026-12-07; `--ab-mux` A/Bs it against one task per "
        "connection). Where walcar's CPU goes with it (cProfile in walcar, 8 s of set-only memaslap, "
        "2026-12-07): the send of each answer (the kernel waking memaslap) ~18 µs per set and the largest "
        "single item; the recv ~2 µs; the rest spread thin over parsing, building the entry, the journal "
        "writer and the link's PubAck parsing, the ingress's ack bookkeeping and trio's scheduling, none "
        "above ~10% alone. Gets pay a second hop (client -> walcar -> memcached), two socket sends in "
        "Python per request.",
        "",
    ]
    return "\n".join(lines)


# Two walcars an A/B compares: (name, WALCAR_MEMCACHED_IO, [sidecar.journal] settings).
Variant = tuple[str, str, dict]
AB_MUX: tuple[Variant, Variant] = (("walcar tasks", "tasks", {}), ("walcar mux", "", {}))
AB_PACKS: tuple[Variant, Variant] = (("walcar unpacked", "", {"pack_entries": 1}), ("walcar packs", "", {}))


def ab_mux(args: argparse.Namespace, memcached: str, nats_url: str, memcached_port: int,
           variants: tuple[Variant, Variant] = AB_MUX, rounds: int = 0) -> None:
    """A/B in one invocation: sets through twemproxy and two walcars (by default one task per connection
    against the listener multiplexer; `AB_PACKS`: one entry a journal message against packs), alternating
    per round; then set latency."""
    rounds = rounds or args.ab_mux
    namespace = "bench" + uuid.uuid4().hex[:8]
    load = [os.getloadavg()[0]]
    tps: dict[str, list[float]] = {"b": [], "c": [], "d": []}
    cpu: dict[str, list[float]] = {"b": [], "c": [], "d": []}
    with tempfile.TemporaryDirectory(prefix="walcar-bench-") as tmp:
        workdir = Path(tmp)
        twemproxy, tw_port = start_twemproxy(workdir, memcached)
        (c_name, c_io, c_journal), (d_name, d_io, d_journal) = variants
        tasks, tasks_port = start_memcached_walcar(workdir / "c", nats_url, memcached, namespace, io=c_io,
                                                   journal=c_journal)
        mux, mux_port = start_memcached_walcar(workdir / "d", nats_url, memcached, namespace + "m", io=d_io,
                                               journal=d_journal)
        nats_pids = pids_listening(int(nats_url.rsplit(":", 1)[1]))
        memcached_pids = pids_listening(memcached_port)
        ports = {"b": tw_port, "c": tasks_port, "d": mux_port}
        accounted = {"b": [twemproxy.pid, *memcached_pids], "c": [tasks.proc.pid, *nats_pids],
                     "d": [mux.proc.pid, *nats_pids]}
        names = {"a": "memcached", "b": "twemproxy", "c": c_name, "d": d_name}
        try:
            for round_ in range(rounds):
                order = ("b", "c", "d") if round_ % 2 == 0 else ("b", "d", "c")
                for server in order:
                    before = cpu_seconds(accounted[server])
                    rate, ops = memaslap(ports[server], 1.0, args.seconds, args.connections, workdir)
                    tps[server].append(rate)
                    cpu[server].append((cpu_seconds(accounted[server]) - before) / max(ops, 1) * 1e6)
                    print(f"round {round_ + 1} set {names[server]:16} {rate:>9,.0f} ops/s  "
                          f"{cpu[server][-1]:6.1f} µs CPU/op", flush=True)
            lat = {}
            for server, port in (("a", memcached_port), ("c", tasks_port), ("d", mux_port)):
                lat[server] = latency(port, "set", args.latency_seconds)
                print(f"latency set {names[server]:16} p50 {lat[server][0]:.3f} ms  p99 {lat[server][1]:.3f} ms",
                      flush=True)
        finally:
            tasks.stop()
            mux.stop()
            stop(twemproxy)
            delete_streams(nats_url, namespace)
            delete_streams(nats_url, namespace + "m")
            load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in tps.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    c, d = names["c"], names["d"]
    print(f"median sets/s: twemproxy {med['b']:,.0f}, {c} {med['c']:,.0f} ({med['c'] / med['b']:.2f}x), "
          f"{d} {med['d']:,.0f} ({med['d'] / med['b']:.2f}x); {d} / {c} {med['d'] / med['c']:.2f}x")
    print(f"median CPU µs/set: twemproxy+memcached {med_cpu['b']:.1f}, {c}+nats {med_cpu['c']:.1f}, "
          f"{d}+nats {med_cpu['d']:.1f}")
    print(f"added set p99: {c} {lat['c'][1] - lat['a'][1]:+.3f} ms, {d} {lat['d'][1] - lat['a'][1]:+.3f} ms; "
          f"load average before/after {load[0]:.1f} / {load[1]:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15, help="memaslap run length per workload and server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    parser.add_argument("--ab-mux", type=int, default=0, metavar="ROUNDS",
                        help="instead: A/B sets of one task per connection vs the listener multiplexer (mux.py)")
    parser.add_argument("--ab-packs", type=int, default=0, metavar="ROUNDS",
                        help="instead: A/B sets journaled one entry a message vs in packs (pack_entries)")
    args = parser.parse_args()
    command = "python bench/memcached/run.py " + " ".join(sys.argv[1:])
    for tool in (MEMASLAP, NUTCRACKER):
        if not Path(tool).exists():
            print(f"missing {tool}: apt-get install libmemcached-tools nutcracker", file=sys.stderr)
            return 2
    services = ensure_up()
    memcached = f"{services.memcached[0]}:{services.memcached[1]}"
    if args.ab_mux or args.ab_packs:
        ab_mux(args, memcached, services.nats_url, services.memcached[1],
               AB_PACKS if args.ab_packs else AB_MUX, args.ab_packs or args.ab_mux)
        return 0
    namespace = "bench" + uuid.uuid4().hex[:8]
    results = Results(load=[os.getloadavg()[0]])
    with tempfile.TemporaryDirectory(prefix="walcar-bench-") as tmp:
        workdir = Path(tmp)
        twemproxy, tw_port = start_twemproxy(workdir, memcached)
        walcar, wc_port = start_memcached_walcar(workdir, services.nats_url, memcached, namespace)
        ports = {"a": services.memcached[1], "b": tw_port, "c": wc_port}
        names = {"a": "memcached", "b": "twemproxy", "c": "walcar"}
        memcached_pids = pids_listening(services.memcached[1])
        nats_pids = pids_listening(int(services.nats_url.rsplit(":", 1)[1]))
        # CPU accounted to each setup: the processes a request passes through.
        accounted = {"a": memcached_pids, "b": [twemproxy.pid, *memcached_pids], "c": [walcar.proc.pid, *nats_pids]}
        try:
            for workload, share in (("set", 1.0), ("get90/set10", 0.1)):
                for server in ("a", "b", "c"):
                    if server == "c" and share < 1.0:
                        accounted["c"] = [walcar.proc.pid, *nats_pids, *memcached_pids]
                    before = cpu_seconds(accounted[server])
                    tps, ops = memaslap(ports[server], share, args.seconds, args.connections, workdir)
                    cpu = (cpu_seconds(accounted[server]) - before) / max(ops, 1) * 1e6
                    results.tps[(server, workload)] = tps
                    results.cpu[(server, workload)] = cpu
                    print(f"{workload:12} {names[server]:10} {tps:>10,.0f} ops/s  {cpu:6.1f} µs CPU/op", flush=True)
            for command_name in ("set", "get"):
                for server in ("a", "c"):
                    results.lat[(server, command_name)] = latency(ports[server], command_name, args.latency_seconds)
                    p50, p99, n = results.lat[(server, command_name)]
                    print(f"latency {command_name:4} {names[server]:10} p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
                          f"({n} requests)", flush=True)
        finally:
            walcar.stop()
            stop(twemproxy)
            delete_streams(services.nats_url, namespace)
            results.load.append(os.getloadavg()[0])
    report(SECTION, markdown(results, args, command), args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
