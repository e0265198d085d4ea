"""Which Python Kafka client the kafka target uses: confluent-kafka vs aiokafka, same broker, same records.

    pip install aiokafka   # not a walcar dependency; only this comparison needs it
    python bench/targets/kafka_clients.py [--records 100000] [--rounds 2]

Each round: one producer per client, idempotent, acks=all, linger 5 ms, producing
`--records` 200-byte values over 1000 keys to an 8-partition topic from one Python
process, waiting for every delivery. Rounds alternate the clients; the first round warms
the broker up (it is printed, and the best round counts).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from confluent_kafka import Producer

from bench.common import table
from bench.targets.run import create_topic, delete_topic
from tests.support.services import ensure_up

VALUE = b"x" * 200


def confluent(bootstrap: str, topic: str, keys: list[bytes]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5})
    began = time.perf_counter()
    for key in keys:
        while True:
            try:
                producer.produce(topic, VALUE, key, on_delivery=lambda error, _: None)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush()
    return len(keys) / (time.perf_counter() - began)


async def aiokafka(bootstrap: str, topic: str, keys: list[bytes]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
    await producer.start()
    began = time.perf_counter()
    deliveries = [await producer.send(topic, VALUE, key=key) for key in keys]
    await asyncio.gather(*deliveries)
    rate = len(keys) / (time.perf_counter() - began)
    await producer.stop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bootstrap = ensure_up().kafka
    topic = create_topic(bootstrap)
    keys = [f"k{i % 1000}".encode() for i in range(args.records)]
    rates: dict[str, list[float]] = {"confluent-kafka": [], "aiokafka": []}
    try:
        for _ in range(args.rounds):
            rates["confluent-kafka"].append(confluent(bootstrap, topic, keys))
            rates["aiokafka"].append(asyncio.run(aiokafka(bootstrap, topic, keys)))
    finally:
        delete_topic(bootstrap, topic)
    rows = [[name, " / ".join(f"{r:,.0f}" for r in values), f"{max(values):,.0f}/s"]
            for name, values in rates.items()]
    print(table(["client", "records/s by round", "best"], rows))


if __name__ == "__main__":
    main()
