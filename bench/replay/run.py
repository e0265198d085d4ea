"""Replay benchmark: `walcar replay` rate against the drain's rate, on the same journal, in the same run.

    python bench/replay/run.py [--entries 1000000] [--writes-per-key 10] [--value-size 100] [--record]

1. prefill a fresh namespace (16 partitions) with N PUTs over N/writes-per-key keys,
   through the sidecar's ingress (journaled, nothing applied);
2. drain it: a drain (`Sidecar(role="drain")`, in this process) whose namespace has
   only a memcached target (a private memcached), timed until every partition consumer
   acked the last entry; then the same with only a Cassandra target (the shared node);
3. replay the whole range with the real CLI (`python -m sidecar.replay.cli replay`)
   to an empty memcached and to a fresh Cassandra table, with and without
   `--last-value-only`. The job's own elapsed time (from its JSON summary) gives the
   rate; process start-up is printed separately.

Rates are entries of the range per second. With --record the results replace the
"Replay" section of docs/benchmarks.md. A benchmark, not a test: the box has 2 cores
shared by NATS, Cassandra, memcached, the drain and the replay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tomli_w
import trio
from pymemcache.client.base import Client as MemcacheClient

from bench.common import CASSANDRA_PASSWORD_FILE, ROOT, delete_streams, drop_keyspace, record, sidecar_document
from sidecar import config as config_mod
from sidecar.app import Sidecar
from sidecar.config import stream_name
from sidecar.drain.consumer import consumer_name
from sidecar.envelope import Op
from sidecar.ingress import Ingress
from sidecar.log.service import open_journal
from tests.support.procs import MemcachedProcess
from tests.support.services import ensure_up
from tests.support.streams import js_api

SECTION = "Replay"
PARTITIONS = 16


def document(nats_url: str, namespace: str, targets: list[dict]) -> dict:
    # A lease TTL nobody else uses: the lease bucket (one per TTL) is shared by every drainer on the server, and
    # a drainer's fair share counts all of them, even those serving other namespaces (see the replay report).
    return sidecar_document(nats_url, {namespace: {"partitions": PARTITIONS, "replay_window": "2h",
                                                   "targets": targets}},
                            log_level="warning", drain={"lease_ttl": "7.77s"})


def memcached_target(port: int) -> dict:
    return {"name": "cache", "type": "memcached", "servers": [f"127.0.0.1:{port}"]}


def cassandra_target(port: int, keyspace: str) -> dict:
    return {"name": "db", "type": "cassandra", "contact_points": [f"127.0.0.1:{port}"], "keyspace": keyspace,
            "username": "cassandra", "password_file": str(CASSANDRA_PASSWORD_FILE), "consistency": "ONE",
            "timeout": "5s"}


async def prefill(config: config_mod.Config, namespace: str, entries: int, keys: int, value_size: int) -> float:
    """N PUTs journaled through the ingress by 64 concurrent writers; returns the seconds it took."""
    work = iter(range(entries))
    async with open_journal(config, name="bench-prefill") as journal:
        ingress = Ingress(config, journal)
        began = time.monotonic()

        async def writer() -> None:
            for i in work:
                value = f"{i:0{value_size}d}".encode()
                ack = await ingress.write(ingress.entry(namespace, Op.PUT, f"k{i % keys}", value=value))
                assert ack.ok, ack

        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(writer)
        return time.monotonic() - began


async def drained(nats_url: str, namespace: str, target: str, last_seq: int) -> bool:
    for partition in range(PARTITIONS):
        info = await js_api(nats_url, f"CONSUMER.INFO.{stream_name(namespace)}.{consumer_name(target, partition)}")
        if "error" in info or info["num_pending"] or info["num_ack_pending"]:
            return False
        if info["delivered"]["stream_seq"] < last_seq and info["num_pending"]:
            return False
    return True


async def time_drain(config: config_mod.Config, nats_url: str, namespace: str, target: str, last_seq: int) -> float:
    """A drain-only sidecar for this config; seconds until every partition acked everything."""
    async with trio.open_nursery() as nursery:
        began = time.monotonic()
        sidecar: Sidecar = await nursery.start(Sidecar(config, role="drain", connect_retry=5.0).run)
        while not await drained(nats_url, namespace, target, last_seq):
            await trio.sleep(0.2)
        elapsed = time.monotonic() - began
        sidecar.request_shutdown("benchmark")
    return elapsed


def replay(config_path: Path, namespace: str, target_args: list[str], extra: list[str]) -> tuple[float, float, dict]:
    """The real CLI; (job seconds, wall seconds, summary)."""
    checkpoint = Path(tempfile.mkdtemp()) / "checkpoint.json"
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sidecar.replay.cli", "replay", "--config", str(config_path),
                           "--namespace", namespace, *target_args, "--json", "--checkpoint", str(checkpoint),
                           *extra], capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - began
    if proc.returncode != 0:
        raise RuntimeError(f"replay failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    return summary["elapsed_s"], wall, summary


def flush(port: int) -> None:
    client = MemcacheClient(("127.0.0.1", port))
    client.flush_all(noreply=False)
    client.close()


async def main(args: argparse.Namespace) -> None:
    services = ensure_up()
    token = secrets.token_hex(3)
    namespace = f"benchrp{token}"
    keyspace = f"bench_replay_{token}"
    keys = max(1, args.entries // args.writes_per_key)
    workdir = Path(tempfile.mkdtemp(prefix="walcar-bench-replay-"))
    cache = MemcachedProcess(workdir / "memcached")
    cache.start()
    try:
        cass_port = services.cassandra[1]
        memcached_doc = document(services.nats_url, namespace, [memcached_target(cache.port)])
        cassandra_doc = document(services.nats_url, namespace, [cassandra_target(cass_port, keyspace)])
        config_path = workdir / "walcar.toml"
        config_path.write_text(tomli_w.dumps(memcached_doc))

        print(f"prefilling {args.entries:,} entries over {keys:,} keys ({args.value_size} B values)...", flush=True)
        prefill_s = await prefill(config_mod.validate(memcached_doc), namespace, args.entries, keys, args.value_size)
        last_seq = (await js_api(services.nats_url, f"STREAM.INFO.{stream_name(namespace)}"))["state"]["last_seq"]
        print(f"  {prefill_s:.1f}s ({args.entries / prefill_s:,.0f}/s), last seq {last_seq}", flush=True)

        rows: list[tuple[str, str, float, float, float]] = []
        drains: dict[str, float] = {}
        for target, doc in (("cache", memcached_doc), ("db", cassandra_doc)):
            print(f"draining to {target}...", flush=True)
            seconds = await time_drain(config_mod.validate(doc), services.nats_url, namespace, target, last_seq)
            drains[target] = seconds
            rows.append((target, "drain", seconds, seconds, args.entries / seconds))
            print(f"  {seconds:.1f}s ({args.entries / seconds:,.0f}/s)", flush=True)

        memcached_args = ["--to-memcached", f"127.0.0.1:{cache.port}"]
        runs = [("cache", "replay", memcached_args, []),
                ("cache", "replay --last-value-only", memcached_args, ["--last-value-only"])]
        for table, mode, extra in (("copy_all", "replay", []), ("copy_last", "replay --last-value-only",
                                                                ["--last-value-only"])):
            cass_args = ["--to-cassandra", f"127.0.0.1:{cass_port}", "--keyspace", keyspace, "--table", table,
                         "--username", "cassandra", "--password-file", str(CASSANDRA_PASSWORD_FILE),
                         "--consistency", "ONE"]
            runs.append(("db", mode, cass_args, extra))
        for target, mode, target_args, extra in runs:
            if target == "cache":
                await trio.to_thread.run_sync(flush, cache.port)
            print(f"{mode} to {target}...", flush=True)
            job_s, wall_s, summary = await trio.to_thread.run_sync(replay, config_path, namespace, target_args, extra)
            assert summary["progress"]["seen"] == args.entries, summary["progress"]
            rows.append((target, mode, job_s, wall_s, args.entries / job_s))
            print(f"  {job_s:.1f}s job, {wall_s:.1f}s with start-up ({args.entries / job_s:,.0f}/s), "
                  f"applied {summary['progress']['applied']:,}", flush=True)
    finally:
        cache.stop()
        await trio.to_thread.run_sync(delete_streams, services.nats_url, namespace)
        drop_keyspace(services.cassandra[1], keyspace, services.cassandra[0])

    names = {"cache": "memcached", "db": "cassandra"}
    lines = [f"| {names[target]} | {mode} | {job:.1f} | {wall:.1f} | {rate:,.0f} | "
             f"{rate / (args.entries / drains[target]):.2f} |" for target, mode, job, wall, rate in rows]
    table = "\n".join(["| target | what | seconds | with start-up | entries/s | × drain |",
                       "|---|---|---|---|---|---|", *lines])
    print()
    print(table)
    if args.record:
        command = f"python bench/replay/run.py --entries {args.entries} --writes-per-key {args.writes_per_key} " \
                  f"--value-size {args.value_size} --record"
        record(SECTION, f"""
`{command}` on {platform.machine()} with {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.
{args.entries:,} PUTs over {keys:,} keys ({args.value_size}-byte values) in one namespace of {PARTITIONS}
partitions (prefill through the ingress: {prefill_s:.1f}s, {args.entries / prefill_s:,.0f}/s). "drain" is a
drain-only sidecar applying the backlog to a namespace with only that target, timed from its start (leases and
consumers included) until every partition acked the last entry; the replays run the real CLI over
the same range to an empty memcached and to a fresh Cassandra table (`--last-value-only`: {keys:,} writes).
Rates are entries of the range per second of the job (start-up, ~1-2 s, shown apart). NATS, Cassandra,
memcached, the drain and the replay share the box's CPUs: numbers are noisy, ratios matter more.

{table}
""")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--writes-per-key", type=int, default=10)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    trio.run(main, parser.parse_args())
