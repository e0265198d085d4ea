"""The KV API's cost per durable write against its HTTP floor (issue 24 item 3).

In one invocation, with the same client (wrk, one thread, keep-alive) and the same
connection counts:

* floor: a constant JSON answer on hypercorn + trio with walcar's KV listener configuration
  (bench/kv/floor.py; `--servers` adds walcar's own serving code and hypercorn on asyncio);
* walcar single: `POST /v1/log/{ns}` with one entry, against a real `walcar run --role ingress`
  journaling to a real nats-server (a namespace without targets: the cost up to the PubAck);
* walcar batch: the same route with a list of `--batch` entries (entries/s = requests/s × batch).

Each server runs alone (the others are stopped), each point `--repeat` times interleaved,
the median kept. Ratios are against the floor measured in this run.

    python bench/kv/run.py [--seconds 5] [--conns 1,32] [--batch 100] [--repeat 2] [--servers ...] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    cpu_seconds,
    delete_streams,
    free_port,
    machine,
    median,
    report,
    start_walcar,
    stop,
    table,
    wait_port,
)
from tests.support.services import ensure_up
from tests.support.sidecar import sidecar_document

FLOOR = Path(__file__).with_name("floor.py")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_script(body: bytes, directory: Path) -> Path:
    """A wrk script POSTing `body` as JSON (wrk's Lua takes a long string literal as it is)."""
    path = directory / f"post-{len(body)}.lua"
    level = "=" * 4  # [====[ ... ]====]: a body holding "]]" cannot end the literal
    path.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = [{level}[{body.decode()}]{level}]\n")
    return path


def wrk(url: str, script: Path, conns: int, seconds: float, server: int) -> tuple[float, float, float, int, float]:
    """(requests/s, p50 ms, p99 ms, non-2xx answers, the server's CPU µs per request) of one wrk run;
    `server` is the server's pid."""
    cpu = cpu_seconds([server])
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def quantile(name: str) -> float:
        value, unit = re.search(rf"^\s+{name}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu_us = (cpu_seconds([server]) - cpu) / max(1, requests) * 1e6
    return rate, quantile("50%"), quantile("99%"), int(errors.group(1)) if errors else 0, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conns", default="1,32", help="comma-separated connection counts")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--servers", default="hypercorn-trio",
                        help="floors, comma-separated: hypercorn-trio (the baseline, always first), walcar-trio, "
                             "hypercorn-asyncio")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed (Debian: apt-get install wrk)")
    services = ensure_up()
    conns = [int(c) for c in args.conns.split(",")]
    floors = ["hypercorn-trio", *[s for s in args.servers.split(",") if s and s != "hypercorn-trio"]]
    namespace = f"b{uuid.uuid4().hex[:8]}"
    scratch = Path(tempfile.mkdtemp(prefix="walcar-bench-kv-"))
    single = json.dumps({"key": "user:1", "text": "x" * 100}).encode()
    batch = json.dumps([{"key": f"user:{n % 50}", "text": "x" * 100} for n in range(args.batch)]).encode()
    scripts = {"single": wrk_script(single, scratch), "batch": wrk_script(batch, scratch)}
    load = os.getloadavg()[0]

    # (server, body, conns) -> list of (req/s, p50, p99, CPU µs per request)
    samples: dict[tuple[str, str, int], list[tuple[float, float, float, float]]] = {}
    kv_port = free_port()
    document = sidecar_document(services.nats_url, {namespace: {"partitions": 4}},
                                [{"protocol": "kv", "bind": f"127.0.0.1:{kv_port}"}], log_level="warning")
    try:
        for _ in range(args.repeat):
            for server in floors:
                port = free_port()
                proc = subprocess.Popen([sys.executable, str(FLOOR), str(port), "--server", server])
                try:
                    wait_port(port, proc)
                    for n in conns:
                        rate, p50, p99, bad, cpu = wrk(f"http://127.0.0.1:{port}/v1/log/{namespace}",
                                                       scripts["single"], n, args.seconds, proc.pid)
                        assert not bad, f"{bad} non-2xx answers from {server}"
                        samples.setdefault((server, "single", n), []).append((rate, p50, p99, cpu))
                finally:
                    stop(proc)
            walcar = start_walcar(scratch / "walcar", document)
            try:
                for body in ("single", "batch"):
                    for n in conns:
                        rate, p50, p99, bad, cpu = wrk(f"http://127.0.0.1:{kv_port}/v1/log/{namespace}",
                                                       scripts[body], n, args.seconds, walcar.pid)
                        assert not bad, f"{bad} non-2xx answers from walcar ({body}, {n} conns)"
                        samples.setdefault(("walcar", body, n), []).append((rate, p50, p99, cpu))
            finally:
                walcar.stop()
    finally:
        delete_streams(services.nats_url, namespace)
        shutil.rmtree(scratch, ignore_errors=True)

    def point(server: str, body: str, n: int) -> tuple[float, ...]:
        runs = samples[(server, body, n)]
        return tuple(median([r[i] for r in runs]) for i in range(4))

    rows = []
    for n in conns:
        floor_rate, floor_p50, _, _ = point("hypercorn-trio", "single", n)
        single_rate = point("walcar", "single", n)[0]
        for server, body in [*((f, "single") for f in floors), ("walcar", "single"), ("walcar", "batch")]:
            rate, p50, p99, cpu = point(server, body, n)
            per = args.batch if body == "batch" else 1
            label = f"{server} (floor)" if server != "walcar" else f"walcar {body}" + (
                f" of {args.batch}" if body == "batch" else "")
            vs_floor = f"{rate / floor_rate:.2f}x" if body == "single" else "—"
            vs_single = f"{rate * per / single_rate:.1f}x" if server == "walcar" else "—"
            rows.append([str(n), label, f"{rate:,.0f}", f"{rate * per:,.0f}", vs_floor, vs_single,
                         f"{p50:.2f} ms", f"{p50 - floor_p50:+.2f} ms", f"{p99:.2f} ms", f"{cpu:,.0f} µs"])
    headers = ["conns", "server", "req/s", "entries/s", "req/s vs floor", "entries/s vs single", "p50",
               "p50 − floor", "p99", "server CPU/req"]
    command = (f"python bench/kv/run.py --seconds {args.seconds:g} --conns {args.conns} --batch {args.batch} "
               f"--repeat {args.repeat}" + (f" --servers {','.join(floors)}" if len(floors) > 1 else ""))
    report("KV API cost per durable write (floor, single, batch)",
           f"`{command}` — {machine()}; load average {load:.2f} at the start (the box is shared); wrk 4.1, one "
           f"thread, keep-alive; bodies of one 100-byte entry, or {args.batch} of them; the median of "
           f"{args.repeat} interleaved runs of {args.seconds:g} s per point. walcar: `walcar run --role ingress`, "
           f"one namespace without targets (4 partitions) on a real nats-server; the floor answers the same "
           f"JSON without writing. Server CPU/req: the server process's CPU time (user + system, all threads) "
           f"over the requests wrk counted — nats-server's not included; steadier than rates on a loaded box."
           f"\n\n{table(headers, rows)}\n", args.record)


if __name__ == "__main__":
    main()
