"""Replication benchmark: two regions on loopback (two nats-servers, two memcached, two sidecars).

    python bench/replication/run.py [--rate 1000] [--seconds 20] [--backlog 50000] [--record]

1. Lag: region A takes a steady `--rate` writes/s through its KV API for `--seconds`;
   each entry's lag is the time from its write time in A to its arrival in B's stream.
2. Throughput: with both of A's targets paused, A journals `--backlog` writes; then the
   local memcached target is resumed alone and timed to an empty backlog, then the
   `wal` target towards B, timed until B's stream holds them all. Ratio: A->B / local.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import nats
import trio

from bench.common import SidecarProcess, free_port, machine, percentile, record, sidecar_document, start_walcar, table
from sidecar.envelope import decode
from tests.support.httpload import KvConnection
from tests.support.procs import MemcachedProcess, NatsProcess

NS = "bench"


def start_regions(workdir: Path) -> tuple[list[NatsProcess | MemcachedProcess], SidecarProcess, SidecarProcess]:
    processes: list[NatsProcess | MemcachedProcess] = []
    kv = {"a": free_port(), "b": free_port()}
    sidecars = {}
    token = workdir / "region.token"  # the cross-region endpoint is off without one
    token.write_text("bench-region-token\n")
    for name, peer in (("b", "a"), ("a", "b")):
        nats_server = NatsProcess(workdir / name / "nats")
        cache = MemcachedProcess(workdir / name / "memcached")
        nats_server.start()
        cache.start()
        processes += [nats_server, cache]
        targets = [{"name": "cache", "type": "memcached", "servers": [f"127.0.0.1:{cache.port}"]},
                   {"name": "peer", "type": "wal", "url": f"http://127.0.0.1:{kv[peer]}", "batch_size": 500,
                    "token_file": str(token)}]
        document = sidecar_document(nats_server.url, {NS: {"partitions": 16, "targets": targets}},
                                    [{"protocol": "kv", "bind": f"127.0.0.1:{kv[name]}"}],
                                    region=f"region-{name}", log_level="warning", region_token_file=str(token))
        sidecars[name] = start_walcar(workdir / name, document, role="all")
    return processes, sidecars["a"], sidecars["b"]


async def steady_load(bind: str, rate: int, seconds: float, connections: int = 64) -> int:
    host, port = bind.split(":")
    period = connections / rate
    sent = 0

    async def client(index: int) -> None:
        nonlocal sent
        connection = await KvConnection.open(host, int(port))
        start = trio.current_time() + index / rate
        n = 0
        while trio.current_time() - start < seconds:
            await trio.sleep_until(start + n * period)
            await connection.post(f"/v1/log/{NS}", {"key": f"k{index}-{n % 100}", "text": "v" * 200})
            sent += 1
            n += 1
        await connection.aclose()

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(client, index)
    return sent


async def burst(bind: str, count: int, connections: int = 32) -> None:
    host, port = bind.split(":")
    work = iter(range(count))

    async def client() -> None:
        connection = await KvConnection.open(host, int(port))
        for i in work:
            await connection.post(f"/v1/log/{NS}", {"key": f"b{i % 5000}", "text": "v" * 200})
        await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(client)


async def watch_lag(url: str, state: dict[str, float], timeout: float) -> list[float]:
    """Lag of each entry arriving in a region's stream (its write time in A to now), until
    `state["expected"]` (set once the load is done) have arrived or `timeout` passed."""
    nc = await nats.connect(url)
    lags: list[float] = []

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        lags.append(time.time() - decode(msg.data).write_time / 1e6)

    sub = await nc.jetstream().subscribe(f"wal.{NS}.*", cb=on_message, ordered_consumer=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(lags) < state["expected"]:
        await asyncio.sleep(0.2)
    await sub.unsubscribe()
    await nc.close()
    return lags


def stream_count(url: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(f"WAL_{NS.upper()}")).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def admin(sidecar: SidecarProcess, path: str) -> dict:
    return httpx.post(f"{sidecar.admin}{path}", json={}, timeout=10).json()


def backlog(sidecar: SidecarProcess, target: str) -> int:
    rows = httpx.get(f"{sidecar.admin}/v1/drain", timeout=10).json()["targets"]
    return next(r["backlog"] for r in rows if r["target"] == target)


def wait(predicate, timeout: float = 600) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(0.2)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="walcar-bench-repl-") as tmp:
        processes, a, b = start_regions(Path(tmp))
        b_url = b.document["sidecar"]["nats_url"]
        a_kv = a.document["listeners"][0]["bind"]
        try:
            state = {"expected": float("inf")}
            lags: list[float] = []
            sent = 0

            async def lag_run() -> None:
                nonlocal sent
                async with trio.open_nursery() as nursery:
                    async def watch() -> None:
                        lags.extend(await trio.to_thread.run_sync(
                            lambda: asyncio.run(watch_lag(b_url, state, args.seconds + 60))))
                    nursery.start_soon(watch)
                    await trio.sleep(1.0)
                    sent = await steady_load(a_kv, args.rate, args.seconds)
                    state["expected"] = sent

            trio.run(lag_run)
            in_b = stream_count(b_url)

            for target in ("cache", "peer"):
                admin(a, f"/v1/drain/{NS}/{target}/pause")
            time.sleep(2)
            trio.run(burst, a_kv, args.backlog)
            before_b = stream_count(b_url)
            admin(a, f"/v1/drain/{NS}/cache/resume")
            local_time = wait(lambda: backlog(a, "cache") == 0)
            admin(a, f"/v1/drain/{NS}/peer/resume")
            remote_time = wait(lambda: stream_count(b_url) >= before_b + args.backlog)
            local_rate = args.backlog / local_time
            remote_rate = args.backlog / remote_time
        finally:
            for sidecar in (a, b):
                sidecar.stop()
            for process in processes:
                process.stop()
    lag_table = table(["steady load asked", "written in A", "arrived in B", "lag p50", "lag p99", "lag max"], [[
        f"{args.rate}/s for {args.seconds:g}s", f"{sent:,} ({sent / args.seconds:,.0f}/s)", f"{in_b:,}",
        f"{percentile(lags, 0.5) * 1e3:.0f} ms",
        f"{percentile(lags, 0.99) * 1e3:.0f} ms", f"{max(lags, default=0) * 1e3:.0f} ms"]])
    rate_table = table(["backlog", "local drain (memcached in A)", "A -> B (wal target)", "A->B / local"], [[
        f"{args.backlog:,}", f"{local_rate:,.0f}/s", f"{remote_rate:,.0f}/s", f"{remote_rate / local_rate:.2f}x"]])
    print(lag_table)
    print(rate_table)
    if args.record:
        command = f"python bench/replication/run.py --rate {args.rate} --seconds {args.seconds:g} " \
                  f"--backlog {args.backlog}"
        record("Replication", f"`{command}` — {machine()}; two regions on loopback, 16 partitions, 200-byte "
                              f"values; lag = write time in A to arrival in B's stream.\n\n{lag_table}\n\n"
                              f"{rate_table}\n")


if __name__ == "__main__":
    main()
