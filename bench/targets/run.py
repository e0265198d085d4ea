"""Drain to the http and kafka targets, against the same client library writing directly, same run.

    python bench/targets/run.py [--entries 200000] [--http-entries 20000] [--keys 10000] [--packs 1,4,16]
                                [--orderings partition,key] [--record]

kafka: the journal is prefilled with `--entries` 200-byte writes over `--keys` keys, then a
drain-only `walcar run --role drain` produces them to a 16-partition topic on the project's
Kafka (scripts/services); the rate comes from the backlog falling to zero (as bench/drain). Once per
`--packs` value: the backlog journaled with about that many entries per message (1: one each; more:
packs, as the writer stores a partition's entries queued in one group commit).
Direct: confluent-kafka's Producer with the target's settings (idempotent, acks=all, lz4,
linger 5 ms, murmur2 partitioning), producing the same records (keys, values and the five walcar-*
headers the target adds) from one Python loop with a delivery callback per record, once before and
once after the drain, averaged.

http: the same with `--http-entries` entries into an application in its own process
(bench/targets/sink.py: hypercorn on trio answering 200), one request per entry, 32 in
flight. Direct: an httpx AsyncClient on trio posting the same bodies and headers to the
same URLs with 32 tasks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import trio
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import delete_streams, machine, record, sidecar_document, start_walcar, stop, table, wait_port
from bench.drain.run import PARTITIONS, PAYLOAD, prefill, watch_drain
from sidecar import config as config_mod
from tests.support.procs import free_port
from tests.support.services import ensure_up

CONCURRENCY = 32
HERE = Path(__file__).resolve().parent


def create_topic(bootstrap: str) -> str:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    return topic


def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # held until the result is in
    admin.delete_topics([topic])[topic].result(30)


def drain(services: object, target: dict, entries: int, keys: int, pack: int = 1) -> float:
    """Entries/s of a drain-only sidecar through a prefilled backlog into `target` (named "t"); `pack`:
    about how many entries each journal message holds (bench/drain/run.py's prefill)."""
    namespace = f"b{uuid.uuid4().hex[:8]}"
    document = sidecar_document(services.nats_url,  # type: ignore[attr-defined]
                                {namespace: {"partitions": PARTITIONS, "targets": [target]}},
                                log_level="warning", journal={"max_inflight_entries": 50_000})
    config = config_mod.validate(document)
    messages = trio.run(prefill, config, namespace, entries, keys, pack)
    with tempfile.TemporaryDirectory() as tmp:
        walcar = start_walcar(Path(tmp), document, role="drain", wait_ready=False)
        try:
            rate, _ = trio.run(watch_drain, config, namespace, entries, walcar.proc.pid,
                               lambda: walcar.proc.poll() is None, messages)
            return rate
        finally:
            walcar.stop()
            delete_streams(services.nats_url, namespace)  # type: ignore[attr-defined]


# --- kafka --------------------------------------------------------------------------------------


def kafka_target(bootstrap: str, topic: str, ordering: str = "partition") -> dict:
    return {"name": "t", "type": "kafka", "bootstrap_servers": [bootstrap], "topic": topic, "ordering": ordering}


def direct_kafka(bootstrap: str, entries: int, keys: int) -> float:
    topic = create_topic(bootstrap)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "compression.type": "lz4", "partitioner": "murmur2_random",
                         "queue.buffering.max.kbytes": 32 * 1024})
    delivered = [0]

    def on_delivery(error: object, _message: object) -> None:
        assert error is None, error
        delivered[0] += 1

    began = time.monotonic()
    for i in range(entries):
        key = f"k{i % keys}".encode()
        while True:
            try:
                # The headers the kafka target puts on each record: an application producing the same
                # records directly would send them too.
                producer.produce(topic, PAYLOAD, key, on_delivery=on_delivery,
                                 headers={"walcar-id": uuid.uuid4().hex.encode(),
                                          "walcar-write-time": b"%d" % time.time_ns(), "walcar-op": b"put",
                                          "walcar-origin": b"local", "walcar-seq": b"%d" % i})
                break
            except BufferError:
                producer.poll(0.005)
        producer.poll(0)
    producer.flush(60)
    rate = entries / (time.monotonic() - began)
    assert delivered[0] == entries
    delete_topic(bootstrap, topic)
    return rate


def kafka_rows(services: object, entries: int, keys: int, packs: list[int],
               orderings: list[str]) -> list[list[str]]:
    """One row per journal layout (`packs`: entries per message) and target `ordering`, all between the same
    two direct runs."""
    bootstrap = services.kafka  # type: ignore[attr-defined]
    before = direct_kafka(bootstrap, entries, keys)
    cases = [(pack, ordering) for pack in packs for ordering in orderings]
    rates = []
    for pack, ordering in cases:
        topic = create_topic(bootstrap)
        try:
            rates.append(drain(services, kafka_target(bootstrap, topic, ordering), entries, keys, pack))
        finally:
            delete_topic(bootstrap, topic)
    after = direct_kafka(bootstrap, entries, keys)
    direct = (before + after) / 2
    return [[f"kafka, {pack} entr{'y' if pack == 1 else 'ies'}/message, ordering {ordering}", f"{entries:,}",
             f"{direct:,.0f}/s (confluent-kafka Producer; {before:,.0f} before, {after:,.0f} after)",
             f"{rate:,.0f}/s", f"{rate / direct:.2f}x"] for (pack, ordering), rate in zip(cases, rates, strict=True)]


# --- http ----------------------------------------------------------------------------------------


def start_sink() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "sink.py"), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


async def direct_http(url: str, entries: int, keys: int) -> float:
    work = iter(range(entries))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY,
                                                     max_keepalive_connections=CONCURRENCY)) as client:

        async def worker() -> None:
            for i in work:
                key = f"k{i % keys}"
                headers = {"idempotency-key": uuid.uuid4().hex, "walcar-sequence": str(i), "walcar-op": "put",
                           "walcar-key": key, "content-type": "application/octet-stream"}
                response = await client.post(f"{url}/apply/bench/{key}", content=PAYLOAD, headers=headers)
                assert response.status_code == 200, response.status_code

        began = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)
        return entries / (time.monotonic() - began)


def http_rows(services: object, entries: int, keys: int) -> list[str]:
    sink, url = start_sink()
    try:
        before = trio.run(direct_http, url, entries, keys)
        target = {"name": "t", "type": "http", "url": f"{url}/apply/{{namespace}}/{{key}}",
                  "concurrency": CONCURRENCY}
        rate = drain(services, target, entries, keys)
        after = trio.run(direct_http, url, entries, keys)
    finally:
        stop(sink)
    direct = (before + after) / 2
    return ["http", f"{entries:,}", f"{direct:,.0f}/s (httpx AsyncClient, {CONCURRENCY} tasks; {before:,.0f} "
            f"before, {after:,.0f} after)", f"{rate:,.0f}/s", f"{rate / direct:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000, help="kafka backlog")
    parser.add_argument("--http-entries", type=int, default=20_000, help="http backlog")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--targets", default="kafka,http")
    parser.add_argument("--packs", default="1,4,16",
                        help="kafka: entries per journal message to drain, one drain each (1: no packs)")
    parser.add_argument("--orderings", default="partition",
                        help="kafka: the target's `ordering` (partition, key), one drain each")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    services = ensure_up()
    headers = ["target", "entries", "direct", "drain", "drain/direct"]
    rows = []
    for kind in args.targets.split(","):
        if kind == "kafka":
            rows += kafka_rows(services, args.entries, args.keys, [int(p) for p in args.packs.split(",")],
                               args.orderings.split(","))
        else:
            rows.append(http_rows(services, args.http_entries, args.keys))
        print(table(headers, rows), flush=True)
    if args.record:
        command = (f"python bench/targets/run.py --entries {args.entries} --http-entries {args.http_entries} "
                   f"--keys {args.keys} --packs {args.packs} --orderings {args.orderings}")
        record("Targets: http and kafka", f"`{command}` — {machine()}; 200-byte values, {PARTITIONS} partitions, "
               f"one drain-only sidecar; direct = the same client library writing straight to the target, once "
               f"before and once after the drain, averaged.\n\n{table(headers, rows)}\n")


if __name__ == "__main__":
    main()
