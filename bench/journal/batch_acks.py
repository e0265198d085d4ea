"""What one PubAck per write costs against JetStream fast-ingest batches (ADR-50), same server, same run.

    python bench/journal/batch_acks.py [--messages 100000] [--rounds 3] [--flow 100]

Both sides publish 200-byte messages with a `Nats-Msg-Id` over the sidecar's trio link (link.py):
(1) as the journal writer does, every message with a reply subject under one wildcard inbox and a
window of 2,000 PubAcks in flight; (2) as one fast-ingest batch in `gap: fail` mode asking for a flow
ack every `--flow` messages, two flow acks outstanding (ADR-50's advice). Rounds alternate; each
prints messages/s and µs of CPU per message in nats-server and in this process (the link's parsing).

The journal does not use (2) — tests/integration/test_journal_batch_acks.py shows why (no stream
sequence per message, duplicates skipped silently); this measures what that leaves on the table.
Needs `scripts/services up nats`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from bench.common import cpu_seconds, machine, median, pids_listening
from sidecar.log.link import NatsLink, new_inbox
from sidecar.log.wire import encode_publish
from tests.support.services import ensure_up
from tests.support.streams import js_api

PAYLOAD = b"x" * 200
WINDOW = 2000


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def per_message_acks(link: NatsLink, subject: str, count: int, run: str, payload: bytes = PAYLOAD) -> None:
    inbox = new_inbox()
    acked = 0
    room = trio.Event()

    def on_ack(_subject: bytes, _reply: bytes, data: bytes, _headers: bytes | None) -> None:
        nonlocal acked, room
        if b'"error"' in data:
            raise RuntimeError(data)
        acked += 1
        room.set()

    link.subscribe(f"{inbox}.*", on_ack)
    await trio.sleep(0.1)
    sent = 0
    while sent < count:
        burst = []
        while sent < count and sent - acked < WINDOW and len(burst) < 256:
            sent += 1
            burst.append(encode_publish(subject, b"%s.%d" % (inbox.encode(), sent),
                                        {"Nats-Msg-Id": f"{run}-{sent}"}, payload))
        if burst:
            link.send(b"".join(burst))
        while sent - acked >= WINDOW or (sent == count and acked < count):
            room = trio.Event()
            await room.wait()


async def fast_batch(link: NatsLink, subject: str, count: int, flow: int, run: str) -> None:
    prefix = new_inbox()
    acked = 0  # highest batch sequence the server says is stored (gap: fail: all up to it)
    every = flow
    done = trio.Event()
    room = trio.Event()

    def on_reply(_subject: bytes, _reply: bytes, data: bytes, _headers: bytes | None) -> None:
        nonlocal acked, every, room
        reply = json.loads(data)
        kind = reply.get("type")
        if kind == "ack":
            acked, every = max(acked, reply["seq"]), reply["msgs"]
            room.set()
        elif kind is None:  # the final PubAck
            if "error" in reply or reply.get("count") != count:
                raise RuntimeError(reply)
            done.set()
        else:
            raise RuntimeError(reply)

    link.subscribe(f"{prefix}.>", on_reply)
    await trio.sleep(0.1)
    sent = 0
    while sent < count:
        burst = []
        while sent < count and (sent == 0 or sent < acked + every * 2) and len(burst) < 256:
            sent += 1
            operation = 2 if sent == count else (0 if sent == 1 else 1)
            reply = f"{prefix}.{flow}.fail.{sent}.{operation}.$FI".encode()
            burst.append(encode_publish(subject, reply, {"Nats-Msg-Id": f"{run}-{sent}"}, PAYLOAD))
            if sent == 1:
                break  # the first reply says which flow the server allows
        link.send(b"".join(burst))
        if sent < count:
            room = trio.Event()
            await room.wait()
    await done.wait()


async def main_async(args: argparse.Namespace) -> None:
    services = ensure_up()
    nats_pids = pids_listening(int(services.nats_url.rsplit(":", 1)[1]))
    stream, subject = f"BENCH_ACKS_{uuid.uuid4().hex[:8].upper()}", f"benchacks.{uuid.uuid4().hex[:8]}"
    created = await js_api(services.nats_url, f"STREAM.CREATE.{stream}", {
        "name": stream, "subjects": [subject], "storage": "file", "allow_batched": True})
    assert "error" not in created, created
    results: dict[str, list[tuple[float, float, float]]] = {"PubAck per message": [], "fast-ingest batch": []}
    link = NatsLink(services.nats_url, name="bench-batch-acks")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            while not link.connected:
                await trio.sleep(0.05)
            for round_ in range(args.rounds):
                order = list(results) if round_ % 2 == 0 else list(reversed(results))
                for name in order:
                    run = uuid.uuid4().hex[:8]
                    server_before, client_before, began = cpu_seconds(nats_pids), own_cpu(), time.perf_counter()
                    if name == "fast-ingest batch":
                        await fast_batch(link, subject, args.messages, args.flow, run)
                    else:
                        await per_message_acks(link, subject, args.messages, run)
                    elapsed = time.perf_counter() - began
                    server = (cpu_seconds(nats_pids) - server_before) / args.messages * 1e6
                    client = (own_cpu() - client_before) / args.messages * 1e6
                    results[name].append((args.messages / elapsed, server, client))
                    print(f"round {round_ + 1} {name:20} {args.messages / elapsed:>10,.0f} msgs/s  nats-server "
                          f"{server:5.1f} µs/msg  client {client:5.1f} µs/msg", flush=True)
            nursery.cancel_scope.cancel()
    finally:
        await js_api(services.nats_url, f"STREAM.DELETE.{stream}")
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds:")
    base = median([r[0] for r in results["PubAck per message"]])
    for name, rows in results.items():
        rate = median([r[0] for r in rows])
        print(f"  {name:20} {rate:>10,.0f} msgs/s ({rate / base:.2f}x)  nats-server "
              f"{median([r[1] for r in rows]):5.1f} µs/msg  client {median([r[2] for r in rows]):5.1f} µs/msg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flow", type=int, default=100, help="fast ingest: ask for a flow ack every N messages")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
