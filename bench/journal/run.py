"""Journal benchmark: walcar's group-commit writer against raw nats-py pipelined publish, same server, same run.

    python bench/journal/run.py [--messages 100000] [--clients 500] [--rounds 3] [--http-seconds 10] [--record]

1. raw nats-py: one asyncio task publishing 200-byte messages with a Nats-Msg-Id and a
   reply subject under one wildcard ack inbox (pipelined, a window of in-flight acks)
2. walcar JournalWriter.publish from N concurrent trio clients (the same messages)
3. the full ingress path: Entry envelopes through Journal.append from N trio clients
4. the KV HTTP API (`POST /v1/log/{ns}`) of a real `walcar run`, 32 keep-alive connections

(1)-(3) run --rounds times, back to back; each path's ratio is the median over the rounds of
its rate against (1) in the same round (pairs made under the same background load), its
rate and latencies those of its best round. Prints rates, ratios against (1), and ack
latency p50/p99. Needs `scripts/services up nats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats
import trio

from bench.common import (
    delete_streams,
    free_port,
    machine,
    median,
    percentile,
    record,
    sidecar_document,
    start_walcar,
    table,
)
from sidecar import config as config_mod
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.service import open_journal
from tests.support.httpload import KvConnection
from tests.support.services import ensure_up

PAYLOAD = b"x" * 200


async def raw_nats(url: str, count: int, window: int = 20_000) -> tuple[float, list[float]]:
    nc = await nats.connect(url, skip_subject_validation=True, pending_size=64 * 1024 * 1024)
    stream = f"BENCH_RAW_{uuid.uuid4().hex[:8].upper()}"
    await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(
        {"name": stream, "subjects": [f"benchraw.{stream}.>"], "storage": "file"}).encode())
    done = asyncio.Event()
    acked = 0
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    async def on_ack(msg: nats.aio.msg.Msg) -> None:
        nonlocal acked
        acked += 1
        latencies.append(time.perf_counter() - sent_at.pop(msg.subject))
        if acked == count:
            done.set()

    inbox = nc.new_inbox()
    await nc.subscribe(f"{inbox}.*", cb=on_ack)
    began = time.perf_counter()
    for i in range(count):
        reply = f"{inbox}.{i}"
        sent_at[reply] = time.perf_counter()
        await nc.publish(f"benchraw.{stream}.{i % 16}", PAYLOAD, reply=reply, headers={"Nats-Msg-Id": f"r{i}"})
        while i - acked > window:
            await asyncio.sleep(0)
    await done.wait()
    rate = count / (time.perf_counter() - began)
    await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"")
    await nc.close()
    return rate, latencies


async def walcar_writer(url: str, count: int, clients: int, envelopes: bool) -> tuple[float, list[float]]:
    name = f"bench{uuid.uuid4().hex[:8]}"
    config = config_mod.validate({"sidecar": {"nats_url": url}, "namespaces": {name: {"partitions": 16}}})
    latencies: list[float] = []
    async with open_journal(config) as journal:
        per_client = count // clients

        async def client(c: int) -> None:
            for i in range(per_client):
                began = time.perf_counter()
                if envelopes:
                    key = f"user-{c}-{i % 50}"
                    entry = Entry(id=f"e{c}-{i}", ns=name, op=Op.PUT, key=key, partition=partition_of(key, 16),
                                  value=PAYLOAD, write_time=now_us())
                    result = await journal.append(entry)
                else:
                    result = await journal.writer.publish(f"wal.{name}.{i % 16}", PAYLOAD,
                                                          {"Nats-Msg-Id": f"w{c}-{i}"})
                latencies.append(time.perf_counter() - began)
                assert result.ok, result

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for c in range(clients):
                nursery.start_soon(client, c)
        rate = per_client * clients / (time.perf_counter() - began)
    await trio.to_thread.run_sync(delete_streams, url, name)
    return rate, latencies


async def kv_http(url: str, seconds: float, connections: int = 32) -> tuple[float, list[float]]:
    name = f"bench{uuid.uuid4().hex[:8]}"
    port = free_port()
    document = sidecar_document(url, {name: {}}, [{"protocol": "kv", "bind": f"127.0.0.1:{port}"}],
                                log_level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        walcar = start_walcar(Path(tmp), document, role="all")
        try:
            latencies: list[float] = []
            deadline = time.monotonic() + seconds

            async def client(c: int) -> None:
                connection = await KvConnection.open("127.0.0.1", port)
                i = 0
                while time.monotonic() < deadline:
                    began = time.perf_counter()
                    status, _ = await connection.post(f"/v1/log/{name}", {"key": f"k{c}-{i % 100}", "text": "v" * 200})
                    latencies.append(time.perf_counter() - began)
                    assert status == 200
                    i += 1
                await connection.aclose()

            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for c in range(connections):
                    nursery.start_soon(client, c)
            return len(latencies) / (time.perf_counter() - began), latencies
        finally:
            walcar.stop()
            await trio.to_thread.run_sync(delete_streams, url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--http-seconds", type=float, default=10.0)
    parser.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()
    url = ensure_up().nats_url

    runs: dict[str, list[tuple[float, list[float]]]] = {"raw": [], "writer": [], "entries": []}
    for _ in range(args.rounds):
        runs["raw"].append(asyncio.run(raw_nats(url, args.messages)))
        runs["writer"].append(trio.run(walcar_writer, url, args.messages, args.clients, False))
        runs["entries"].append(trio.run(walcar_writer, url, args.messages, args.clients, True))
    http_rate, http_lat = trio.run(kv_http, url, args.http_seconds)

    def ratio(path: str) -> float:
        return median([run[0] / raw[0] for run, raw in zip(runs[path], runs["raw"], strict=True)])

    def row(name: str, path: str) -> list[str]:
        rate, latencies = max(runs[path], key=lambda run: run[0])
        return [name, f"{rate:,.0f}/s", f"{ratio(path):.2f}x", f"{percentile(latencies, 0.5) * 1e3:.2f} ms",
                f"{percentile(latencies, 0.99) * 1e3:.2f} ms"]

    best_raw = max(rate for rate, _ in runs["raw"])
    result = table(["path", "rate (best round)", "vs raw (median)", "ack p50", "ack p99"], [
        row("raw nats-py pipelined publish (1 asyncio task)", "raw"),
        row(f"JournalWriter.publish, {args.clients} trio clients", "writer"),
        row(f"Journal.append (envelopes), {args.clients} trio clients", "entries"),
        ["KV API POST /v1/log, 32 keep-alive connections", f"{http_rate:,.0f}/s", f"{http_rate / best_raw:.2f}x",
         f"{percentile(http_lat, 0.5) * 1e3:.2f} ms", f"{percentile(http_lat, 0.99) * 1e3:.2f} ms"],
    ])
    rounds = "; ".join(f"{raw[0]:,.0f} / {w[0]:,.0f} / {e[0]:,.0f}"
                       for raw, w, e in zip(runs["raw"], runs["writer"], runs["entries"], strict=True))
    result += f"\n\nEvery round (raw / writer / envelopes, writes/s): {rounds}.\n"
    print(result)
    if args.record:
        command = (f"python bench/journal/run.py --messages {args.messages} --clients {args.clients} "
                   f"--rounds {args.rounds} --http-seconds {args.http_seconds:g}")
        record("Journal", f"`{command}` — {machine()}, 200-byte writes, shared nats-server v2.15.2 "
                          f"(file store, R1).\n\n{result}\n")


if __name__ == "__main__":
    main()
