"""What packing several entries into one JetStream message would save, journal and drain, same server, same run.

    python bench/journal/packed.py [--entries 100000] [--pack 1,4,16,64] [--rounds 3]

A design probe for issues 21 and 24, not a path walcar has: today every write is one message, so
nats-server stores, acknowledges, delivers and takes an ack for each. Here the same 200-byte entries
go as messages of `pack` entries each (a msgpack list, as the journal would write a group commit's
entries for one partition), over the sidecar's trio link (link.py):

1. journal: published with a `Nats-Msg-Id` and a reply subject each, 2,000 PubAcks in flight
   (as bench/journal/batch_acks.py, the writer's own pattern);
2. drain: one pull consumer (explicit acks) reading the stream back, 256 messages a request,
   each message decoded and acked (`+ACK` to its reply subject, one write per read), as
   drain/consumer.py does.

Prints, per pack size, entries/s and µs of CPU per entry in nats-server and in this process.
Needs `scripts/services up nats`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec
import trio

from bench.common import cpu_seconds, machine, median, pids_listening
from bench.journal.batch_acks import PAYLOAD, own_cpu, per_message_acks
from sidecar.log.link import NatsLink, new_inbox
from tests.support.services import ensure_up
from tests.support.streams import js_api

PULL = 256


async def drain_back(link: NatsLink, url: str, stream: str, messages: int, pack: int) -> None:
    """Read every message of `stream` through a pull consumer, decode it, ack it."""
    consumer = f"bench{uuid.uuid4().hex[:8]}"
    created = await js_api(url, f"CONSUMER.CREATE.{stream}.{consumer}", {
        "stream_name": stream, "config": {"durable_name": consumer, "name": consumer, "ack_policy": "explicit",
                                          "max_ack_pending": 20_000, "deliver_policy": "all"}})
    assert "error" not in created, created
    decoder = msgspec.msgpack.Decoder(list[bytes])
    inbox = new_inbox()
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    state = {"received": 0, "outstanding": 0, "entries": 0}
    replies: list[bytes] = []
    done = trio.Event()

    def ask() -> None:
        size = min(PULL, messages - state["received"] - state["outstanding"])
        if size > 0:
            state["outstanding"] += size
            link.publish(subject, json.dumps({"batch": size, "expires": 5_000_000_000}).encode(), reply=inbox)

    def flush() -> None:
        link.publish_to_each(replies, b"+ACK")
        replies.clear()
        if state["outstanding"] == 0:
            ask()
        if state["received"] >= messages:
            done.set()

    def on_message(_subject: bytes, reply: bytes, data: bytes, _headers: bytes | None) -> None:
        if not reply:
            return  # a status (a request that ended): the next ask covers it
        state["entries"] += len(decoder.decode(data)) if pack > 1 else 1
        state["received"] += 1
        state["outstanding"] -= 1
        if not replies:
            link.after_read(flush)
        replies.append(reply)

    sid = link.subscribe(inbox, on_message)
    await trio.sleep(0.05)
    ask()
    await done.wait()
    link.unsubscribe(sid)
    assert state["entries"] == messages * pack, state


async def main_async(args: argparse.Namespace) -> None:
    services = ensure_up()
    nats_pids = pids_listening(int(services.nats_url.rsplit(":", 1)[1]))
    packs = [int(p) for p in args.pack.split(",")]
    # (pack) -> [(entries/s, server µs/entry, client µs/entry)] per phase
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    link = NatsLink(services.nats_url, name="bench-packed")
    encoder = msgspec.msgpack.Encoder()
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        while not link.connected:
            await trio.sleep(0.05)
        for round_ in range(args.rounds):
            for pack in packs if round_ % 2 == 0 else list(reversed(packs)):
                stream, subject = f"BENCH_PACK_{uuid.uuid4().hex[:8].upper()}", f"benchpack.{uuid.uuid4().hex[:8]}"
                created = await js_api(services.nats_url, f"STREAM.CREATE.{stream}", {
                    "name": stream, "subjects": [subject], "storage": "file"})
                assert "error" not in created, created
                messages = args.entries // pack
                payload = encoder.encode([PAYLOAD] * pack) if pack > 1 else PAYLOAD
                try:
                    for phase in ("journal", "drain"):
                        server_before, client_before, began = cpu_seconds(nats_pids), own_cpu(), time.perf_counter()
                        if phase == "journal":
                            await per_message_acks(link, subject, messages, uuid.uuid4().hex[:8], payload)
                        else:
                            await drain_back(link, services.nats_url, stream, messages, pack)
                        elapsed = time.perf_counter() - began
                        entries = messages * pack
                        row = (entries / elapsed, (cpu_seconds(nats_pids) - server_before) / entries * 1e6,
                               (own_cpu() - client_before) / entries * 1e6)
                        results.setdefault((pack, phase), []).append(row)
                        print(f"round {round_ + 1} pack {pack:3} {phase:7} {row[0]:>10,.0f} entries/s  "
                              f"nats-server {row[1]:5.1f} µs/entry  client {row[2]:5.1f} µs/entry", flush=True)
                finally:
                    await js_api(services.nats_url, f"STREAM.DELETE.{stream}")
        nursery.cancel_scope.cancel()
    print(f"\n{machine()}; load average {os.getloadavg()[0]:.1f}; {args.entries:,} entries of {len(PAYLOAD)} bytes; "
          f"medians of {args.rounds} rounds:")
    print("| entries per message | journal entries/s | nats-server µs/entry | client µs/entry "
          "| drain entries/s | nats-server µs/entry | client µs/entry |")
    print("|---|---|---|---|---|---|---|")
    for pack in packs:
        cells = []
        for phase in ("journal", "drain"):
            rows = results[(pack, phase)]
            cells += [f"{median([r[0] for r in rows]):,.0f}", f"{median([r[1] for r in rows]):.1f}",
                      f"{median([r[2] for r in rows]):.1f}"]
        print(f"| {pack} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--pack", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
