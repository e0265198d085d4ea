"""Drain benchmark: a prefilled backlog drained to memcached and Cassandra, against direct writes, same run.

    python bench/drain/run.py [--entries 1000000] [--keys 100000] [--small 200000] [--record]

For each target: the journal is prefilled with `--entries` 200-byte writes over `--keys`
keys, then a drain-only `walcar run --role drain` applies it; the rate is measured
from the backlog (JetStream consumer state) falling to zero. In the same run the same
number of writes go to the target directly with its own client library (pymemcache
set_many in batches of 100 from 4 threads; cassandra-driver execute_concurrent,
concurrency 128), once before and once after the drain, averaged. The drainer's peak
RSS is read from /proc for the full backlog and for a `--small` one, to show memory does
not grow with the backlog.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio
from cassandra.concurrent import execute_concurrent_with_args
from pymemcache.client.base import Client as MemcacheClient

from bench.common import (
    CASSANDRA_PASSWORD_FILE,
    cassandra_cluster,
    delete_streams,
    drop_keyspace,
    machine,
    record,
    sidecar_document,
    start_walcar,
    table,
)
from sidecar import config as config_mod
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.journal import Journal
from sidecar.log.service import open_journal
from tests.support.services import ensure_up

PAYLOAD = b"v" * 200
PARTITIONS = 16


def target_settings(kind: str, services: object, keyspace: str) -> dict:
    if kind == "memcached":
        host, port = services.memcached  # type: ignore[attr-defined]
        return {"name": "t", "type": "memcached", "servers": [f"{host}:{port}"], "pool_size": 8}
    host, port = services.cassandra  # type: ignore[attr-defined]
    return {"name": "t", "type": "cassandra", "contact_points": [f"{host}:{port}"], "keyspace": keyspace,
            "username": "cassandra", "password_file": str(CASSANDRA_PASSWORD_FILE), "consistency": "ONE"}


async def prefill(config: config_mod.Config, namespace: str, entries: int, keys: int, pack: int = 1) -> int:
    """Journal the backlog; returns the messages it took. `pack` > 1: entries are packable and go in
    group commits of `pack` x PARTITIONS, so each partition's message holds about `pack` of them, as the
    writer packs what an ingress queues in one round (sidecar/log/writer.py); 1: one entry a message."""
    async with open_journal(config) as journal:
        writer = journal.writer
        batch = 2000 if pack <= 1 else pack * PARTITIONS
        sequences: set[int] = set()
        for start in range(0, entries, batch):
            messages = []
            for i in range(start, min(entries, start + batch)):
                key = f"{namespace}-{i % keys}"
                entry = Entry(id=f"{namespace}-{i}", ns=namespace, op=Op.PUT, key=key,
                              partition=partition_of(key, PARTITIONS), value=PAYLOAD, write_time=now_us())
                messages.append(journal.message_for(entry, packable=pack > 1))
            results = await writer.publish_many(messages)
            assert all(r.ok for r in results), results[0]
            sequences.update(r.sequence for r in results)
        return len(sequences)


async def backlog(journal: Journal, namespace: str) -> int:
    """Entries not yet applied, over all partitions (consumer state; the stream's count before a consumer exists)."""
    total = 0
    stream = config_mod.stream_name(namespace)
    for p in range(PARTITIONS):
        try:
            info = await journal.writer.conn.js_api(f"CONSUMER.INFO.{stream}.drain-t-{p}")
            total += int(info["num_pending"]) + int(info["num_ack_pending"])
        except Exception:
            subject = f"wal.{namespace}.{p}"
            state = await journal.writer.conn.js_api(f"STREAM.INFO.{stream}", {"subjects_filter": subject})
            total += int((state["state"].get("subjects") or {}).get(f"wal.{namespace}.{p}", 0))
    return total


async def watch_drain(config: config_mod.Config, namespace: str, entries: int, pid: int,
                      alive: Callable[[], bool], messages: int = 0) -> tuple[float, float]:
    """(entries/s, peak RSS MiB) from the backlog sampled four times a second until it is empty. One
    connection for all samples: opening one per sample cost the box CPU the drainer competes for.

    The rate is the slope between the first sample with the drain under way and the last one with a
    backlog left: two measured points. (Timing to the first empty sample, as before 2026-12-07 night,
    counted up to a sampling interval of idle time after the end: a third of a 1.5 s drain.)"""
    async with open_journal(config) as journal:
        samples: list[tuple[float, int]] = []
        peak = 0.0
        while True:
            await trio.sleep(0.25)
            left = await backlog(journal, namespace)
            samples.append((time.monotonic(), left))
            peak = max(peak, peak_rss_mib(pid))
            if left == 0:
                break
            if not alive():
                raise RuntimeError("the drainer exited")
    return rate_of(samples, entries, messages), peak


def rate_of(samples: list[tuple[float, int]], entries: int, messages: int = 0) -> float:
    """Entries/s from (monotonic time, backlog) samples ending at an empty backlog. The backlog is counted
    in messages: `messages` (when packed) turns it back into entries."""
    total = messages or entries
    per_message = entries / total
    first = next(i for i, (_, left) in enumerate(samples) if left < total)
    under_way = samples[first:]
    started, begin_left = under_way[0]
    if not begin_left and first:  # over within a sample: from the last one with everything left
        started, begin_left = samples[first - 1]
    moving = [(t, left) for t, left in under_way if left > 0]
    if len(moving) >= 2 and moving[-1][0] > started:
        last, last_left = moving[-1]
        return (begin_left - last_left) * per_message / (last - started)
    return begin_left * per_message / max(0.001, samples[-1][0] - started)  # over within a sample


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drain(kind: str, services: object, entries: int, keys: int) -> tuple[float, float]:
    """(entries/s, peak RSS MiB) of a drain-only sidecar through a prefilled backlog."""
    namespace = f"b{uuid.uuid4().hex[:8]}"
    keyspace = f"bench_{namespace}"
    document = sidecar_document(
        services.nats_url,  # type: ignore[attr-defined]
        {namespace: {"partitions": PARTITIONS, "targets": [target_settings(kind, services, keyspace)]}},
        log_level="warning", journal={"max_inflight_entries": 50_000},
    )
    config = config_mod.validate(document)
    trio.run(prefill, config, namespace, entries, keys)
    with tempfile.TemporaryDirectory() as tmp:
        # No wait for readiness: the backlog is sampled from the start, as the drainer gets going.
        walcar = start_walcar(Path(tmp), document, role="drain", wait_ready=False)
        try:
            return trio.run(watch_drain, config, namespace, entries, walcar.proc.pid,
                            lambda: walcar.proc.poll() is None)
        finally:
            walcar.stop()
            delete_streams(services.nats_url, namespace)  # type: ignore[attr-defined]
            if kind == "cassandra":
                host, port = services.cassandra  # type: ignore[attr-defined]
                drop_keyspace(port, keyspace, host)


def direct_memcached(services: object, entries: int, keys: int, batch: int, threads: int = 4) -> float:
    """pymemcache from `threads` threads: set_many of `batch` keys, or (batch 1) one set per write, as apps do."""
    prefix = uuid.uuid4().hex[:8]

    def work(worker: int) -> None:
        client = MemcacheClient(services.memcached, default_noreply=False)  # type: ignore[attr-defined]
        for start in range(worker * batch, entries, threads * batch):
            if batch == 1:
                client.set(f"{prefix}-{start % keys}", PAYLOAD)
            else:
                client.set_many({f"{prefix}-{i % keys}": PAYLOAD for i in range(start, min(entries, start + batch))})
        client.close()

    began = time.monotonic()
    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return entries / (time.monotonic() - began)


def direct_cassandra(services: object, entries: int, keys: int) -> float:
    host, port = services.cassandra  # type: ignore[attr-defined]
    cluster = cassandra_cluster(port, host)
    session = cluster.connect()
    keyspace = f"bench_direct_{uuid.uuid4().hex[:8]}"
    session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', "
                    "'replication_factor': 1}")
    session.execute(f"CREATE TABLE {keyspace}.t (id text, key text, value blob, PRIMARY KEY (id, key))")
    insert = session.prepare(f"INSERT INTO {keyspace}.t (id, key, value) VALUES (?, ?, ?) USING TIMESTAMP ?")
    began = time.monotonic()
    for start in range(0, entries, 20_000):
        args = [(f"k{i % keys}", "", PAYLOAD, now_us()) for i in range(start, min(entries, start + 20_000))]
        execute_concurrent_with_args(session, insert, args, concurrency=128)
    rate = entries / (time.monotonic() - began)
    session.execute(f"DROP KEYSPACE {keyspace}")
    cluster.shutdown()
    return rate


def direct_rates(kind: str, services: object, entries: int, keys: int) -> list[tuple[str, float]]:
    """(how, writes/s) of each direct baseline for `kind`."""
    if kind == "memcached":
        return [
            ("pymemcache set_many x100, 4 threads", direct_memcached(services, entries, keys, 100)),
            ("pymemcache set, 4 threads", direct_memcached(services, entries, keys, 1)),
        ]
    return [("execute_concurrent, 128", direct_cassandra(services, entries, keys))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=200_000, help="a smaller backlog, to compare peak RSS")
    parser.add_argument("--targets", default="memcached,cassandra")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    services = ensure_up()
    rows = []
    headers = ["target", "direct", "drain", "drain/direct", "drainer peak RSS, small backlog",
               "drainer peak RSS, full backlog"]
    for kind in args.targets.split(","):
        # The direct baselines run before and after the drain and are averaged: on a shared VM the
        # box's speed drifts over minutes, and bracketing keeps the ratio from riding that drift.
        before = direct_rates(kind, services, args.entries, args.keys)
        rate, peak = drain(kind, services, args.entries, args.keys)
        after = direct_rates(kind, services, args.entries, args.keys)
        _, small_peak = drain(kind, services, args.small, min(args.keys, args.small))
        for (how, first), (_, second) in zip(before, after, strict=True):
            direct = (first + second) / 2
            rows.append([kind, f"{direct:,.0f}/s ({how}; {first:,.0f} before, {second:,.0f} after)", f"{rate:,.0f}/s",
                         f"{rate / direct:.2f}x", f"{small_peak:.0f} MiB ({args.small:,})",
                         f"{peak:.0f} MiB ({args.entries:,})"])
        print(table(headers, rows), flush=True)
    result = table(headers, rows)
    if args.record:
        command = f"python bench/drain/run.py --entries {args.entries} --keys {args.keys} --small {args.small}"
        record("Drain", f"`{command}` — {machine()}; 200-byte values, {PARTITIONS} partitions, one drain-only "
                        f"sidecar; direct = the same client library writing straight to the target, once "
                        f"before and once after the drain, averaged.\n\n{result}\n")


if __name__ == "__main__":
    main()
