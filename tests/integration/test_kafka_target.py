"""The `kafka` target against a real Kafka (scripts/services, KRaft), read back with a real consumer.

Order per key and completeness, deletes as tombstones, a broker restart mid-drain, a record
the broker refuses as too large (DLQ), and a replay through the real CLI.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import pytest
import trio
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from sidecar.admin.dlq import DlqFilter
from sidecar.drain.dlq import key_token
from sidecar.envelope import Op
from sidecar.log.streams import dlq_stream_name
from tests.integration.test_drain import write_load
from tests.integration.test_replay import walcar, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.procs import KafkaProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import build_config, running_sidecar, sidecar_document
from tests.support.streams import read_stream
from tests.support.waiting import until

FAST_RETRY = {"initial_delay": "20ms", "max_delay": "500ms", "multiplier": 2.0, "max_attempts": 50}
DRAIN = {"lease_ttl": "2s", "ack_wait": "10s"}


@dataclass
class Record:
    key: str
    value: bytes | None
    partition: int
    headers: dict[str, str]

    @property
    def id(self) -> str:
        return self.headers["walcar-id"]

    @property
    def seq(self) -> int:
        return int(self.headers["walcar-seq"])


def create_topic(bootstrap: str, topic: str, partitions: int = 8, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1, config=config)])[topic].result(30)


def consume(bootstrap: str, topic: str, until_ids: int, timeout: float = 90.0, at_least: int = 0) -> list[Record]:
    """Every record of the topic, from the start, until `until_ids` distinct entry ids (and `at_least`
    records) were seen."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    records: list[Record] = []
    ids: set[str] = set()
    try:
        deadline = time.monotonic() + timeout
        while (len(ids) < until_ids or len(records) < at_least) and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                headers = {k: v.decode() for k, v in message.headers() or []}
                records.append(Record(message.key().decode(), message.value(), message.partition(), headers))
                ids.add(headers["walcar-id"])
    finally:
        consumer.close()
    return records


def alter_topic(bootstrap: str, topic: str, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET) for name, value in config.items()])
    admin.incremental_alter_configs([resource])[resource].result(30)


def in_order_per_key(records: list[Record]) -> dict[str, list[int]]:
    """Keys whose entries, each counted at its last occurrence, are not in journal order."""
    last_position = {r.id: i for i, r in enumerate(records)}
    lanes: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if last_position[r.id] == i:
            lanes.setdefault(r.key, []).append(r.seq)
    return {k: seqs for k, seqs in lanes.items() if seqs != sorted(seqs)}


def kafka_target(bootstrap: str, topic: str, **settings: object) -> dict:
    return {"name": "events", "type": "kafka", "bootstrap_servers": [bootstrap], "topic": topic, **settings}


def document(services: Services, unique: str, target: dict, **namespace: object) -> dict:
    return sidecar_document(services.nats_url, {unique: {"partitions": 4, "retry": FAST_RETRY,
                                                         "targets": [target], **namespace}}, drain=DRAIN)


ORDERINGS = pytest.mark.parametrize("ordering", ["partition", "key"])


@ORDERINGS
async def test_every_entry_in_order_per_key_deletes_as_tombstones_and_replay(services: Services, unique: str,
                                                                             tmp_path, ordering: str) -> None:
    topic = f"walcar.{unique}"
    await trio.to_thread.run_sync(create_topic, services.kafka, topic)
    doc = document(services, unique, kafka_target(services.kafka, topic, ordering=ordering))
    keys = [f"k{i}" for i in range(100)]
    async with running_sidecar(build_config(doc)) as sidecar:
        last = await write_load(sidecar.ingress, unique, keys, 3000)
        for key in keys[:10]:
            assert (await sidecar.ingress.write(sidecar.ingress.entry(unique, Op.DELETE, key))).ok
        records = await trio.to_thread.run_sync(consume, services.kafka, topic, 3010)
        assert sidecar.drain.drainer(unique, "events").stats.dead_lettered == 0
    assert len({r.id for r in records}) == 3010
    assert not in_order_per_key(records)
    assert all(len({r.partition for r in records if r.key == key}) == 1 for key in keys)  # a key, a partition
    final = {r.key: r for r in records}
    for key in keys[:10]:
        assert final[key].value is None and final[key].headers["walcar-op"] == "delete"  # a tombstone
    for key in keys[10:]:
        assert final[key].value.decode() == last[key]
    sample = records[0].headers
    assert sample["walcar-origin"] == "local" and int(sample["walcar-write-time"]) > 0 and sample["walcar-op"] == "put"

    # Replay: every entry produced again, with the same ids; verify says it does not apply.
    path = str(write_config(tmp_path, doc))
    result = await walcar("replay", "--config", path, "--namespace", unique, "--target", "events")
    assert result.returncode == 0, result.stdout + result.stderr
    again = await trio.to_thread.run_sync(lambda: consume(services.kafka, topic, 3010, at_least=2 * 3010))
    assert len(again) >= 2 * 3010 and {r.id for r in again} == {r.id for r in records}
    verify = await walcar("verify", "--config", path, "--namespace", unique, "--target", "events")
    assert verify.returncode != 0 and "verify does not apply" in verify.stdout + verify.stderr


@ORDERINGS
async def test_complete_and_in_order_across_a_broker_restart(services: Services, private_kafka: KafkaProcess,
                                                            unique: str, ordering: str) -> None:
    topic = f"walcar.{unique}"
    target = kafka_target(private_kafka.bootstrap, topic, create_topic=True, timeout="3s", ordering=ordering)
    keys = [f"k{i}" for i in range(200)]
    async with running_sidecar(build_config(document(services, unique, target))) as sidecar:
        await write_load(sidecar.ingress, unique, keys, 3000)
        await trio.to_thread.run_sync(private_kafka.stop)  # mid-drain: deliveries in flight time out
        await write_load(sidecar.ingress, unique, keys, 3000, first=3000)
        drainer = sidecar.drain.drainer(unique, "events")
        await until(lambda: drainer.state == "breaker-open", 30, "the breaker to open")
        await trio.to_thread.run_sync(private_kafka.start)
        await write_load(sidecar.ingress, unique, keys, 1000, first=6000)
        records = await trio.to_thread.run_sync(consume, private_kafka.bootstrap, topic, 7000)
        assert drainer.stats.dead_lettered == 0
    assert len({r.id for r in records}) == 7000
    assert not in_order_per_key(records)


@ORDERINGS
async def test_complete_and_in_order_when_the_drains_nats_connection_is_cut_mid_drain(
        services: Services, unique: str, ordering: str) -> None:
    """The drain's connection to NATS (through a proxy) cut three times while it drains: what the server was
    sending each time is lost on the wire, and JetStream would send it again only after AckWait (60 s here),
    after newer entries. Every entry still reaches the topic within the test, each key's in journal order."""
    topic = f"walcar.{unique}"
    await trio.to_thread.run_sync(create_topic, services.kafka, topic)
    host, port = services.nats_url.removeprefix("nats://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port))).start()
    direct = document(services, unique, kafka_target(services.kafka, topic, ordering=ordering))
    direct["sidecar"]["drain"] = {**DRAIN, "ack_wait": "60s"}
    through_proxy = {**direct, "sidecar": {**direct["sidecar"], "nats_url": f"nats://127.0.0.1:{proxy.port}",
                                           "admin": f"127.0.0.1:{free_port()}"}}
    keys = [f"k{i}" for i in range(50)]
    try:
        async with running_sidecar(build_config(direct), role="ingress") as writer, \
                running_sidecar(build_config(through_proxy), role="drain"):
            for cut in range(3):
                await write_load(writer.ingress, unique, keys, 1000, first=cut * 1000)
                await trio.sleep(0.05)  # the drain is reading the burst
                proxy.sever()
            records = await trio.to_thread.run_sync(lambda: consume(services.kafka, topic, 3000, timeout=45))
    finally:
        proxy.close()
    assert len({r.id for r in records}) == 3000
    assert not in_order_per_key(records)


async def test_a_record_over_the_topics_limit_is_dead_lettered_before_it_is_sent(services: Services,
                                                                                  unique: str) -> None:
    topic = f"walcar.{unique}"
    await trio.to_thread.run_sync(lambda: create_topic(services.kafka, topic, 2, **{"max.message.bytes": "20000"}))
    doc = document(services, unique, kafka_target(services.kafka, topic))
    async with running_sidecar(build_config(doc)) as sidecar:
        ingress = sidecar.ingress
        # Random bytes: lz4 cannot shrink them under the topic's limit.
        for key, value in (("good", b"1"), ("big", os.urandom(60_000)), ("good", b"2")):
            assert (await ingress.write(ingress.entry(unique, Op.PUT, key, value=value))).ok
        drainer = sidecar.drain.drainer(unique, "events")
        await until(lambda: drainer.stats.dead_lettered == 1, 60, "the dead letter")
        records = await trio.to_thread.run_sync(consume, services.kafka, topic, 2)
    assert [r.value for r in records if r.key == "good"] == [b"1", b"2"]
    letters = await read_stream(services.nats_url, dlq_stream_name(unique))
    assert len(letters) == 1 and letters[0].entry().key == "big"
    headers = letters[0].headers
    assert headers["Walcar-Error-Class"] == "permanent"
    assert "over the topic's max.message.bytes 20000" in headers["Walcar-Error"]


async def test_a_batch_the_broker_refuses_is_retried_and_only_the_record_too_large_is_dead_lettered(
        services: Services, unique: str) -> None:
    """The topic's max.message.bytes shrinks under a running sidecar. The broker refuses the whole batch
    a large record went in (the records beside it fail too): retried, the limit read again, the large
    record dead-lettered before it is sent, alone; the key's other records land, its last one last."""
    topic = f"walcar.{unique}"
    await trio.to_thread.run_sync(lambda: create_topic(services.kafka, topic, 1))
    doc = document(services, unique, kafka_target(services.kafka, topic), partitions=1)
    async with running_sidecar(build_config(doc)) as sidecar:
        ingress = sidecar.ingress
        drainer = sidecar.drain.drainer(unique, "events")
        assert (await ingress.write(ingress.entry(unique, Op.PUT, "k", value=b"0"))).ok
        await until(lambda: drainer.stats.applied == 1, 30, "the producer to start")
        await trio.to_thread.run_sync(lambda: alter_topic(services.kafka, topic, **{"max.message.bytes": "20000"}))
        big = os.urandom(60_000)  # random: lz4 cannot shrink it under the topic's limit
        for value in (b"1", big, b"2"):
            assert (await ingress.write(ingress.entry(unique, Op.PUT, "k", value=value))).ok
        await until(lambda: drainer.stats.dead_lettered == 1, 60, "the dead letter")
        records = await trio.to_thread.run_sync(consume, services.kafka, topic, 3)
        assert drainer.stats.retries >= 1  # the refused batch
        assert drainer.stats.dead_lettered == 1
    letters = await read_stream(services.nats_url, dlq_stream_name(unique))
    assert len(letters) == 1 and letters[0].entry().value == big
    assert "over the topic's max.message.bytes 20000" in letters[0].headers["Walcar-Error"]
    assert {r.value for r in records} == {b"0", b"1", b"2"} and records[-1].value == b"2"


async def test_partition_order_dead_letters_a_record_under_its_own_key_and_strict_holds_the_partition(
        services: Services, unique: str) -> None:
    """ordering = "partition": one lane per journal partition. A record over max_message_size in the middle
    is dead-lettered with its own key (not the lane's); strict holds every later entry of the partition,
    of any key, until that letter is purged; then they land in journal order."""
    topic = f"walcar.{unique}"
    await trio.to_thread.run_sync(create_topic, services.kafka, topic)
    target = kafka_target(services.kafka, topic, max_message_size=20_000)
    doc = document(services, unique, target, partitions=1, strict=True)
    async with running_sidecar(build_config(doc)) as sidecar:
        ingress = sidecar.ingress
        for key, value in (("a", b"1"), ("big", b"x" * 30_000), ("b", b"2"), ("a", b"3")):
            assert (await ingress.write(ingress.entry(unique, Op.PUT, key, value=value))).ok
        drainer = sidecar.drain.drainer(unique, "events")
        await until(lambda: drainer.stats.dead_lettered == 1, 60, "the dead letter")
        letters = await read_stream(services.nats_url, dlq_stream_name(unique))
        assert len(letters) == 1 and letters[0].entry().key == "big"
        assert letters[0].headers["Walcar-Key"] == "big" and letters[0].subject.endswith("." + key_token("big"))
        assert await drainer.has_dead_letters("big")
        await trio.sleep(2.5)  # the partition stays held however long we wait
        held = await trio.to_thread.run_sync(lambda: consume(services.kafka, topic, 3, timeout=3))
        assert [(r.key, r.value) for r in held] == [("a", b"1")]
        assert sidecar.dead_letters is not None
        await sidecar.dead_letters.purge(unique, DlqFilter(seqs=[letters[0].seq]))
        records = await trio.to_thread.run_sync(consume, services.kafka, topic, 3)
    assert [(r.key, r.value) for r in records] == [("a", b"1"), ("b", b"2"), ("a", b"3")]


async def test_an_unknown_topic_is_permanent_when_the_cluster_does_not_create_topics(services: Services,
                                                                                   unique: str) -> None:
    doc = document(services, unique, kafka_target(services.kafka, f"walcar.{unique}.typo", timeout="4s"))
    async with running_sidecar(build_config(doc)) as sidecar:
        ingress = sidecar.ingress
        assert (await ingress.write(ingress.entry(unique, Op.PUT, "k", value=b"v"))).ok
        drainer = sidecar.drain.drainer(unique, "events")
        await until(lambda: drainer.stats.dead_lettered == 1, 60, "the dead letter")
    letters = await read_stream(services.nats_url, dlq_stream_name(unique))
    assert "UNKNOWN_TOPIC" in letters[0].headers["Walcar-Error"]
