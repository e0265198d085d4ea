"""Session fixtures: the real services, and per-test names so tests never see each other's data."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import CassandraProcess, KafkaProcess, MemcachedProcess, NatsProcess
from tests.support.services import Services, ensure_up
from tests.support.streams import remove_streams, stream_names


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    services = ensure_up()
    before = stream_names(services.nats_url)
    yield services
    # The shared nats-server outlives the run (and the next CI run reuses it): leave it as found.
    # Thousands of leftover streams cost it CPU at rest and slow every later test and benchmark.
    remove_streams(services.nats_url, stream_names(services.nats_url) - before)


@pytest.fixture
def unique() -> str:
    """A short token for stream, keyspace and key names private to one test."""
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def cassandra_cluster(services: Services) -> Iterator[object]:
    from tests.support.cassandra import driver_cluster

    host, port = services.cassandra
    cluster = driver_cluster(port, host, password=services.cassandra_password)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def cassandra_session(cassandra_cluster: object) -> object:
    return cassandra_cluster.connect()  # type: ignore[attr-defined]


@pytest.fixture
def keyspace(cassandra_session: object, unique: str) -> Iterator[str]:
    name = f"ks_{unique}"
    cassandra_session.execute(  # type: ignore[attr-defined]
        f"CREATE KEYSPACE {name} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    yield name
    cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {name}")  # type: ignore[attr-defined]


@pytest.fixture
def private_nats(tmp_path: Path, services: Services) -> Iterator[NatsProcess]:
    """A nats-server of this test's own, to stop and restart at will."""
    server = NatsProcess(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_memcached(tmp_path: Path, services: Services) -> Iterator[MemcachedProcess]:
    server = MemcachedProcess(tmp_path / "memcached")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_cassandra(tmp_path: Path, services: Services) -> Iterator[CassandraProcess]:
    """A Cassandra node of this test's own, to stop and restart (slow: ~10-20 s to start)."""
    node = CassandraProcess(tmp_path / "cassandra")
    node.start()
    yield node
    node.stop()


@pytest.fixture
def private_kafka(tmp_path: Path, services: Services) -> Iterator[KafkaProcess]:
    """A Kafka broker of this test's own, to stop and restart (~10 s to start)."""
    broker = KafkaProcess(tmp_path / "kafka")
    broker.start()
    yield broker
    broker.stop()
