"""Prove each shared service is the real thing the sidecar relies on."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import nats
import pytest
from pymemcache.client.base import Client as MemcacheClient

from tests.support.services import Services


async def _create_stream(nc, name: str, subjects: list[str], **extra: object) -> dict:
    config = {"name": name, "subjects": subjects, "storage": "file", "num_replicas": 1, **extra}
    reply = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), timeout=5)
    body = json.loads(reply.data)
    assert "error" not in body, body
    return body


async def _delete_stream(nc, name: str) -> None:
    await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=5)


def test_nats_server_version_is_at_least_2_12(services: Services) -> None:
    async def main() -> tuple[int, int]:
        nc = await nats.connect(services.nats_url)
        try:
            version = nc.connected_server_version
            return version.major, version.minor
        finally:
            await nc.close()

    assert asyncio.run(main()) >= (2, 12)


def test_jetstream_atomic_batch_commits_all_or_nothing(services: Services, unique: str) -> None:
    stream = f"SMOKE_BATCH_{unique.upper()}"

    async def main() -> tuple[dict, int, int]:
        nc = await nats.connect(services.nats_url)
        js = nc.jetstream()
        try:
            await _create_stream(nc, stream, [f"smoke.{unique}.>"], allow_atomic=True)
            batch = uuid.uuid4().hex
            # The first message of a batch is a request: the server answers empty or with an error.
            first = await nc.request(
                f"smoke.{unique}.a", b"one", timeout=5,
                headers={"Nats-Batch-Id": batch, "Nats-Batch-Sequence": "1"},
            )
            assert first.data == b"", first.data
            await nc.publish(f"smoke.{unique}.b", b"two", headers={"Nats-Batch-Id": batch, "Nats-Batch-Sequence": "2"})
            ack = await nc.request(
                f"smoke.{unique}.c", b"three", timeout=5,
                headers={"Nats-Batch-Id": batch, "Nats-Batch-Sequence": "3", "Nats-Batch-Commit": "1"},
            )
            committed = (await js.stream_info(stream)).state.messages

            # A batch that never commits is abandoned: none of its messages are stored.
            abandoned = uuid.uuid4().hex
            await nc.request(
                f"smoke.{unique}.d", b"four", timeout=5,
                headers={"Nats-Batch-Id": abandoned, "Nats-Batch-Sequence": "1"},
            )
            await nc.publish(
                f"smoke.{unique}.e", b"five", headers={"Nats-Batch-Id": abandoned, "Nats-Batch-Sequence": "2"}
            )
            await nc.flush()
            after_abandon = (await js.stream_info(stream)).state.messages
            return json.loads(ack.data), committed, after_abandon
        finally:
            await _delete_stream(nc, stream)
            await nc.close()

    ack, committed, after_abandon = asyncio.run(main())
    assert ack["stream"] == stream
    assert ack["batch"] and ack["count"] == 3
    assert committed == 3
    assert after_abandon == 3


def test_jetstream_scheduled_message_fires_no_earlier_than_asked(services: Services, unique: str) -> None:
    stream = f"SMOKE_SCHED_{unique.upper()}"
    delay = 1.5

    async def main() -> tuple[float, bytes]:
        nc = await nats.connect(services.nats_url)
        js = nc.jetstream()
        try:
            await _create_stream(nc, stream, [f"sched.{unique}.>"], allow_msg_schedules=True)
            at = datetime.now(UTC) + timedelta(seconds=delay)
            published = time.monotonic()
            await js.publish(
                f"sched.{unique}.timer.1", b"later",
                headers={
                    "Nats-Schedule": "@at " + at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "Nats-Schedule-Target": f"sched.{unique}.due",
                },
            )
            sub = await js.subscribe(f"sched.{unique}.due", ordered_consumer=True)
            msg = await sub.next_msg(timeout=10)
            return time.monotonic() - published, msg.data
        finally:
            await _delete_stream(nc, stream)
            await nc.close()

    elapsed, data = asyncio.run(main())
    assert data == b"later"
    # The schedule is second-granular on the server side; never early by more than that rounding.
    assert elapsed >= delay - 1.0, elapsed


def test_memcached_set_get_through_pymemcache(services: Services, unique: str) -> None:
    client = MemcacheClient(services.memcached, default_noreply=False)
    try:
        assert client.set(f"{unique}:k", b"value", expire=60) is True
        assert client.get(f"{unique}:k") == b"value"
        assert client.version().startswith(b"1.")
    finally:
        client.close()


def test_cassandra_write_read_with_writetime(cassandra_session, keyspace: str) -> None:
    session = cassandra_session
    session.execute(f"CREATE TABLE {keyspace}.items (id text, key text, value blob, PRIMARY KEY (id, key))")
    stamp = 1_700_000_000_123_456
    session.execute(
        f"INSERT INTO {keyspace}.items (id, key, value) VALUES (%s, %s, %s) USING TIMESTAMP {stamp}",
        ("id1", "k1", b"v1"),
    )
    row = session.execute(
        f"SELECT value, WRITETIME(value) AS wt FROM {keyspace}.items WHERE id = %s AND key = %s", ("id1", "k1")
    ).one()
    assert row.value == b"v1"
    assert row.wt == stamp
    release = session.execute("SELECT release_version FROM system.local").one().release_version
    assert release.startswith("5.0."), release


def test_kafka_single_kraft_node_creates_topics_only_when_asked(services: Services, unique: str) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

    admin = AdminClient({"bootstrap.servers": services.kafka})
    metadata = admin.list_topics(timeout=10)
    assert len(metadata.brokers) == 1
    broker = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(metadata.brokers))))
    configs = admin.describe_configs([broker])[broker].result(10)
    assert configs["process.roles"].value == "broker,controller"  # KRaft, no ZooKeeper
    assert configs["auto.create.topics.enable"].value == "false"
    topic = f"smoke.{unique}"
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": services.kafka, "enable.idempotence": True, "acks": "all"})
    producer.produce(topic, b"value", b"key")
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": services.kafka, "group.id": unique, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
        assert message is not None and (message.key(), message.value()) == (b"key", b"value")
    finally:
        consumer.close()
        admin.delete_topics([topic])[topic].result(30)


@pytest.mark.parametrize("service", ["memcached", "cassandra", "kafka"])
def test_services_report_up(service: str, services: Services) -> None:
    import subprocess
    import sys

    from tests.support.services import SCRIPT

    out = subprocess.run([sys.executable, str(SCRIPT), "status", "--json"], capture_output=True, text=True)
    rows = {r["service"]: r for r in json.loads(out.stdout)}
    assert rows[service]["state"] == "up"
    assert rows["nats"]["state"] == "up"
