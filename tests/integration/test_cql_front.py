"""The CQL front through real services: apps use cassandra-driver (and cqlsh) against the sidecar only.

Reads must reach Cassandra as before, writes must be journaled before they are
acked (and must not reach Cassandra behind the drain's back), LWT / counters /
TRUNCATE / DDL go to Cassandra synchronously, and a journal outage is an error,
never an ack.  The sidecar runs on its own trio loop in a background thread, so
the tests drive it with the (blocking) driver exactly as an app would.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from cassandra.cluster import Cluster, NoHostAvailable, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import ConstantReconnectionPolicy, DCAwareRoundRobinPolicy
from cassandra.query import BatchStatement as DriverBatch
from cassandra.query import BatchType, SimpleStatement
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import Config, stream_name
from sidecar.envelope import Entry, Op
from sidecar.log.streams import chunk_bucket, dlq_stream_name
from sidecar.protocols.cql.frames import Frame as CqlFrame
from sidecar.protocols.cql.frames import FrameDecoder
from sidecar.protocols.cql.messages import (
    AuthResponse,
    Batch,
    BatchStatement,
    ErrorCode,
    Execute,
    Options,
    Prepare,
    Query,
    QueryParameters,
    Register,
    Startup,
    decode_request,
    decode_response,
    encode_request,
    encode_request_body,
)
from sidecar.protocols.cql.server import serve_cql
from sidecar.protocols.cql.types import CqlProtocolError
from tests.integration.test_drain import cassandra_target
from tests.support.cassandra import driver_cluster
from tests.support.listener import ListenerThread
from tests.support.procs import NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import build_config, running_sidecar, sidecar_document
from tests.support.streams import js_api, read_stream

DC, RACK = "dc-walcar", "rack-9"


# --------------------------------------------------------------------------- harness


def cql_config(nats_url: str, namespace: str, services: Services, port: int | None = None,
               target_timeout: str = "1s") -> Config:
    host, cport = services.cassandra
    listener = {"protocol": "cql", "bind": f"127.0.0.1:{port or free_port()}", "namespace": namespace,
                "data_center": DC, "rack": RACK}
    target = {"type": "cassandra", "name": "db", "contact_points": [f"{host}:{cport}"], "keyspace": "unused",
              "timeout": target_timeout}  # also how long an LWT waits for unapplied journaled writes
    return build_config(sidecar_document(nats_url, {namespace: {"partitions": 8, "targets": [target]}}, [listener]))


class CqlSidecar(ListenerThread):
    """serve_cql over a real journal, as the sidecar wires it, on a trio loop in a background thread."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, serve_cql)

    def stop(self) -> None:
        super().stop()
        assert self._thread is None or not self._thread.is_alive(), "the CQL sidecar did not stop"


def connect(port: int, *, password: str = "cassandra", compression: Any = True, protocol_version: int | None = 4,
            **kwargs: Any) -> Cluster:
    return driver_cluster(port, password=password, load_balancing=DCAwareRoundRobinPolicy(local_dc=DC),
                          protocol_version=protocol_version, compression=compression, **kwargs)


def drop_streams(nats_url: str, namespace: str) -> None:
    """The shared nats-server outlives the test: remove the namespace's journal, DLQ and chunk streams."""
    for name in (stream_name(namespace), dlq_stream_name(namespace), f"OBJ_{chunk_bucket(namespace)}"):
        trio.run(js_api, nats_url, f"STREAM.DELETE.{name}")


def journal(nats_url: str, namespace: str) -> list[tuple[int, Entry]]:
    return [(m.seq, m.entry()) for m in trio.run(read_stream, nats_url, stream_name(namespace))]


def int32(n: int) -> bytes:
    return struct.pack(">i", n)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ks(cassandra_session: Session) -> Iterator[str]:
    """One keyspace for the module: Cassandra DDL is slow, so tables are made once and reused."""
    name = "cqlfront_" + secrets.token_hex(3)
    cassandra_session.execute(
        f"CREATE KEYSPACE {name} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
    for ddl in (
        "CREATE TABLE {ks}.kv (k int, c int, v text, PRIMARY KEY (k, c))",
        "CREATE TABLE {ks}.lwt (k int PRIMARY KEY, v text)",
        "CREATE TABLE {ks}.counts (k int PRIMARY KEY, n counter)",
        "CREATE TABLE {ks}.paged (k int, c int, v text, PRIMARY KEY (k, c))",
    ):
        cassandra_session.execute(ddl.format(ks=name))
    yield name
    cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {name}")


@pytest.fixture(scope="module")
def namespace(services: Services) -> Iterator[str]:
    name = "cql" + secrets.token_hex(4)
    yield name
    drop_streams(services.nats_url, name)


@pytest.fixture
def own_namespace(services: Services) -> Iterator[str]:
    """For tests that run a sidecar of their own."""
    name = "cql" + secrets.token_hex(4)
    yield name
    drop_streams(services.nats_url, name)


@pytest.fixture(scope="module")
def sidecar(services: Services, namespace: str) -> Iterator[CqlSidecar]:
    server = CqlSidecar(cql_config(services.nats_url, namespace, services)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(sidecar: CqlSidecar) -> Iterator[Cluster]:
    c = connect(sidecar.port)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def session(cluster: Cluster, ks: str) -> Session:
    return cluster.connect(ks)


# --------------------------------------------------------------------------- discovery and DDL


def test_driver_sees_only_the_sidecar_and_ddl_passes_through(sidecar: CqlSidecar, ks: str,
                                                             cassandra_session: Session) -> None:
    # Default protocol negotiation: the driver offers v5/DSE first and must settle on v4.
    c = connect(sidecar.port, protocol_version=None)
    try:
        s = c.connect()
        assert c.protocol_version == 4
        hosts = c.metadata.all_hosts()
        assert len(hosts) == 1
        host = hosts[0]
        assert (host.endpoint.address, host.endpoint.port) == ("127.0.0.1", sidecar.port)
        assert (host.datacenter, host.rack) == (DC, RACK)
        direct = cassandra_session.execute("SELECT release_version, cluster_name FROM system.local").one()
        assert host.release_version == direct.release_version
        assert c.metadata.cluster_name == direct.cluster_name
        assert c.metadata.token_map is not None and len(c.metadata.token_map.ring) == 1

        s.execute(f"CREATE TABLE {ks}.made_here (k int PRIMARY KEY, v text)")
        assert "made_here" in c.metadata.keyspaces[ks].tables  # the driver's schema refresh went through
        rows = cassandra_session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (ks,))
        assert "made_here" in {r.table_name for r in rows}

        # DDL made behind the sidecar's back reaches apps that REGISTERed, as a relayed SCHEMA_CHANGE.
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
            decoder = _handshake(sock)
            sock.sendall(encode_request(Register(["SCHEMA_CHANGE"]), 9))
            assert [f.opcode for f in decoder.feed(sock.recv(65536))] == [0x02]  # READY
            cassandra_session.execute(f"CREATE TABLE {ks}.made_directly (k int PRIMARY KEY)")
            events = []
            while not events:
                events = [f for f in decoder.feed(sock.recv(65536)) if f.stream == -1 and f.opcode == 0x0C]
            change = decode_response(events[0]).message
            assert (change.change_type, change.target, change.keyspace, change.name) == (
                "CREATED", "TABLE", ks, "made_directly")
        deadline = time.monotonic() + 10
        while "made_directly" not in c.metadata.keyspaces[ks].tables:  # the driver heard it too
            assert time.monotonic() < deadline, "the driver never saw the relayed schema change"
            time.sleep(0.1)
    finally:
        c.shutdown()


# --------------------------------------------------------------------------- journaled writes


def test_writes_are_journaled_not_applied(session: Session, ks: str, namespace: str, services: Services,
                                          cassandra_session: Session) -> None:
    insert = session.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
    delete = session.prepare("DELETE FROM kv WHERE k = ? AND c = ?")
    sent = [
        ("INSERT INTO kv (k, c, v) VALUES (1, 1, 'one')", None),
        (insert, (2, 2, "two")),
        ("UPDATE kv SET v = 'uno' WHERE k = 1 AND c = 1", None),
        (delete, (2, 2)),
        (f"INSERT INTO {ks}.kv (k, c, v) VALUES (3, 3, 'three') USING TTL 600", None),
    ]
    futures = []
    for statement, params in sent:
        future = session.execute_async(statement, params)
        future.result()
        assert future.custom_payload == {"walcar-durable": b"true", "walcar-visible": b"false"}
        futures.append(future)

    entries = [e for _, e in journal(services.nats_url, namespace) if e.key.startswith(f"{ks}.kv:")]
    assert len(entries) == len(sent)
    by_query = {e.cql.statements[0].query: e for e in entries if e.cql}
    for (statement, params), future in zip(sent, futures, strict=True):
        text = statement if isinstance(statement, str) else statement.query_string
        entry = by_query[text]
        cql = entry.cql
        assert entry.op is Op.CQL and cql is not None and cql.batch_type == -1
        assert entry.write_time == future.message.timestamp  # the driver's client timestamp, in µs
        assert cql.consistency == future.message.consistency_level
        (stmt,) = cql.statements
        assert stmt.keyspace == ks
        if params is not None:
            assert stmt.values == [int32(p) if isinstance(p, int) else p.encode() for p in params]
            assert stmt.types == ["int", "int", "text"][: len(params)]
    # Simple and prepared writes to one partition share a key: per-partition order holds across both.
    assert by_query["INSERT INTO kv (k, c, v) VALUES (1, 1, 'one')"].key == f"{ks}.kv:{int32(1).hex()}"
    assert by_query["UPDATE kv SET v = 'uno' WHERE k = 1 AND c = 1"].key == f"{ks}.kv:{int32(1).hex()}"
    assert by_query[insert.query_string].key == by_query[delete.query_string].key == f"{ks}.kv:{int32(2).hex()}"
    # Acked from the journal: nothing reached Cassandra behind the drain's back.
    assert list(cassandra_session.execute(f"SELECT * FROM {ks}.kv WHERE k IN (1, 2, 3)")) == []


def test_a_full_journal_makes_pipelined_writes_wait_not_fail(services: Services, ks: str,
                                                             own_namespace: str) -> None:
    """With room for only 4 writes in flight, 300 prepared inserts pipelined 64 at a time all wait
    their turn and are acked durable, each journaled once."""
    host, cport = services.cassandra
    target = {"type": "cassandra", "name": "db", "contact_points": [f"{host}:{cport}"], "keyspace": "unused"}
    config = build_config(sidecar_document(
        services.nats_url, {own_namespace: {"partitions": 8, "targets": [target]}},
        [{"protocol": "cql", "bind": f"127.0.0.1:{free_port()}", "namespace": own_namespace, "data_center": DC}],
        journal={"max_inflight_entries": 4, "publish_timeout": "10s"},
    ))
    server = CqlSidecar(config).start()
    c = connect(server.port)
    try:
        s = c.connect(ks)
        insert = s.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
        results = execute_concurrent_with_args(s, insert, [(700, i, f"v{i}") for i in range(300)], concurrency=64)
        assert all(ok for ok, _ in results), [r for ok, r in results if not ok][:3]
        assert server.ingress is not None  # and walcar_writes_total counts them as CQL writes
        assert server.ingress.counters.writes[(own_namespace, "cql", "cql", "true")] == 300
    finally:
        c.shutdown()
        server.stop()
    entries = [e for _, e in journal(services.nats_url, own_namespace)]
    assert sorted(e.cql.statements[0].values[1] for e in entries if e.cql) == sorted(int32(i) for i in range(300))


async def test_sync_namespace_answers_visible_and_a_read_right_after_sees_the_write(
        services: Services, ks: str, own_namespace: str) -> None:
    port = free_port()
    target = cassandra_target("db", services.cassandra[1], ks)
    config = build_config(sidecar_document(
        services.nats_url,
        {own_namespace: {"partitions": 4, "mode": "sync", "visibility_budget": "5s", "targets": [target]}},
        [{"protocol": "cql", "bind": f"127.0.0.1:{port}", "namespace": own_namespace, "data_center": DC}],
        drain={"lease_ttl": "2s"},
    ))

    def app() -> None:
        c = connect(port)
        try:
            s = c.connect(ks)
            insert = s.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
            for i in range(10):
                future = s.execute_async(insert, (800, i, f"seen{i}"))
                future.result()
                assert future.custom_payload == {"walcar-durable": b"true", "walcar-visible": b"true"}
                row = s.execute(SimpleStatement("SELECT v FROM kv WHERE k = 800 AND c = %s"), (i,)).one()
                assert row is not None and row.v == f"seen{i}"
        finally:
            c.shutdown()

    async with running_sidecar(config):
        await trio.to_thread.run_sync(app)


def test_batches_over_several_partitions_are_journaled_atomically(session: Session, ks: str, namespace: str,
                                                                  services: Services) -> None:
    insert = session.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
    logged = DriverBatch(batch_type=BatchType.LOGGED)
    for k in (10, 11, 12):
        logged.add(insert, (k, 1, f"v{k}"))
    logged.add(SimpleStatement("UPDATE kv SET v = 'again' WHERE k = 10 AND c = 2"))
    unlogged = DriverBatch(batch_type=BatchType.UNLOGGED)
    unlogged.add(insert, (20, 1, "a"))
    unlogged.add(insert, (21, 1, "b"))
    futures = []
    for batch in (logged, unlogged):
        future = session.execute_async(batch)
        future.result()
        assert future.custom_payload["walcar-durable"] == b"true"
        futures.append(future)

    stored = journal(services.nats_url, namespace)
    for future, batch_type, ks_keys in ((futures[0], 0, (10, 11, 12)), (futures[1], 1, (20, 21))):
        mine = [(seq, e) for seq, e in stored
                if e.key in {f"{ks}.kv:{int32(k).hex()}" for k in ks_keys} and e.cql and e.cql.batch_type >= 0]
        assert len(mine) == len(ks_keys)
        seqs = [seq for seq, _ in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(ks_keys)))  # one atomic batch: consecutive
        refs = {e.batch.id for _, e in mine if e.batch}
        assert len(refs) == 1 and all(e.batch and e.batch.count == len(ks_keys) for _, e in mine)
        for _, entry in mine:
            assert entry.cql is not None and entry.cql.batch_type == batch_type
            assert entry.write_time == future.message.timestamp  # one timestamp for the whole batch
        if batch_type == 0:
            first = next(e for _, e in mine if e.key == f"{ks}.kv:{int32(10).hex()}")
            assert first.cql is not None
            assert [s.query for s in first.cql.statements] == [
                insert.query_string, "UPDATE kv SET v = 'again' WHERE k = 10 AND c = 2"]


# --------------------------------------------------------------------------- reads


def test_select_pages_through_5k_rows_with_and_without_lz4(sidecar: CqlSidecar, session: Session, ks: str,
                                                           cassandra_session: Session) -> None:
    seed = cassandra_session.prepare(f"INSERT INTO {ks}.paged (k, c, v) VALUES (?, ?, ?)")
    rows = [(k, c, f"row-{k}-{c}") for k in range(10) for c in range(500)]
    execute_concurrent_with_args(cassandra_session, seed, rows, concurrency=64, raise_on_first_error=True)
    expected = {(k, c) for k, c, _ in rows}

    plain = connect(sidecar.port, compression=False)
    try:
        for s in (session, plain.connect(ks)):
            conn = s.cluster.control_connection._connection
            assert (conn.compressor is not None) == (s is session)  # lz4 negotiated only when asked
            got = list(s.execute(SimpleStatement("SELECT k, c, v FROM paged", fetch_size=700)))
            assert len(got) == 5000 and {(r.k, r.c) for r in got} == expected
            prepared = s.prepare("SELECT c, v FROM paged WHERE k = ?")
            prepared.fetch_size = 120
            part = list(s.execute(prepared, (3,)))
            assert [r.c for r in part] == list(range(500)) and part[7].v == "row-3-7"
    finally:
        plain.shutdown()


# --------------------------------------------------------------------------- synchronous paths


def test_lwt_counters_and_truncate_go_to_cassandra(session: Session, ks: str, namespace: str, services: Services,
                                                   cassandra_session: Session) -> None:
    first = session.execute("INSERT INTO lwt (k, v) VALUES (1, 'a') IF NOT EXISTS").one()
    assert first.applied is True
    second = session.execute("INSERT INTO lwt (k, v) VALUES (1, 'b') IF NOT EXISTS").one()
    assert second.applied is False and second.v == "a"
    conditional = session.prepare("UPDATE lwt SET v = ? WHERE k = ? IF v = ?")
    assert session.execute(conditional, ("c", 1, "a")).one().applied is True

    session.execute("UPDATE counts SET n = n + 1 WHERE k = 1")
    session.execute("UPDATE counts SET n = n + 1 WHERE k = 1")
    session.execute(session.prepare("UPDATE counts SET n = n + ? WHERE k = ?"), (5, 1))
    assert cassandra_session.execute(f"SELECT n FROM {ks}.counts WHERE k = 1").one().n == 7
    assert cassandra_session.execute(f"SELECT v FROM {ks}.lwt WHERE k = 1").one().v == "c"

    session.execute("TRUNCATE lwt")
    assert list(cassandra_session.execute(f"SELECT * FROM {ks}.lwt")) == []
    journaled = [e for _, e in journal(services.nats_url, namespace)
                 if e.key.startswith((f"{ks}.lwt", f"{ks}.counts"))]
    assert journaled == []  # state-dependent statements are Cassandra's to answer, not the journal's


def test_lwt_waits_for_unapplied_journaled_writes_then_says_busy(session: Session, ks: str) -> None:
    # No drain runs in this test: the journaled insert stays unapplied, so the LWT on its partition
    # must not run on state Cassandra has not seen yet; it fails with an explicit "busy" error.
    session.execute("INSERT INTO lwt (k, v) VALUES (2, 'journaled')")
    started = time.monotonic()
    with pytest.raises(NoHostAvailable) as raised:
        session.execute("UPDATE lwt SET v = 'x' WHERE k = 2 IF v = 'journaled'")
    assert "walcar busy" in str(raised.value)
    assert 0.9 < time.monotonic() - started < 10
    # Another partition has nothing pending: its LWT runs at once.
    assert session.execute("INSERT INTO lwt (k, v) VALUES (3, 'free') IF NOT EXISTS").one().applied is True


# --------------------------------------------------------------------------- prepared ids, auth, journal outage


def test_unknown_prepared_id_is_reprepared_after_a_sidecar_restart(services: Services, ks: str,
                                                                   own_namespace: str) -> None:
    ns = own_namespace
    config = cql_config(services.nats_url, ns, services)
    server = CqlSidecar(config).start()
    c = connect(server.port, reconnection_policy=ConstantReconnectionPolicy(0.2))
    try:
        s = c.connect(ks)
        insert = s.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
        server.stop()
        server = CqlSidecar(config).start()  # same port, empty prepared cache
        deadline = time.monotonic() + 15
        while True:
            try:
                future = s.execute_async(insert, (40, 1, "after restart"))
                future.result()
                break
            except NoHostAvailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert future.custom_payload["walcar-durable"] == b"true"
        entries = [e for _, e in journal(services.nats_url, ns)]
        assert [e.cql.statements[0].values for e in entries if e.cql] == [[int32(40), int32(1), b"after restart"]]
    finally:
        c.shutdown()
        server.stop()


def test_bad_credentials_are_refused(sidecar: CqlSidecar) -> None:
    c = connect(sidecar.port, password="not-the-password")
    try:
        with pytest.raises(NoHostAvailable) as raised:
            c.connect()
        assert "Provided username cassandra and/or password are incorrect" in str(raised.value)
    finally:
        c.shutdown()


def test_journal_down_is_an_error_never_an_ack(private_nats: NatsProcess, services: Services, ks: str) -> None:
    ns = "cql" + secrets.token_hex(4)
    server = CqlSidecar(cql_config(private_nats.url, ns, services)).start()
    c = connect(server.port)
    try:
        s = c.connect(ks)
        insert = s.prepare("INSERT INTO kv (k, c, v) VALUES (?, ?, ?)")
        ok = s.execute_async(insert, (50, 1, "before"))
        ok.result()
        assert ok.custom_payload["walcar-durable"] == b"true"
        private_nats.stop()
        for statement, params in ((insert, (50, 2, "during")), ("INSERT INTO kv (k, c, v) VALUES (50, 3, 'x')", None)):
            with pytest.raises(NoHostAvailable) as raised:
                s.execute(statement, params)
            text = str(raised.value)
            assert "walcar journal did not take the write" in text
            assert "Unavailable" in text or "Overloaded" in text
        # Reads do not need the journal.
        assert s.execute("SELECT release_version FROM system.local").one() is not None
    finally:
        c.shutdown()
        server.stop()


def test_shutdown_answers_requests_in_flight_then_stops_accepting(services: Services, ks: str,
                                                                  own_namespace: str) -> None:
    server = CqlSidecar(cql_config(services.nats_url, own_namespace, services, target_timeout="3s")).start()
    c = connect(server.port)
    try:
        s = c.connect(ks)
        s.execute("INSERT INTO lwt (k, v) VALUES (70, 'pending')")  # journaled; no drain applies it
        waiting = s.execute_async("UPDATE lwt SET v = 'x' WHERE k = 70 IF v = 'pending'")  # waits ~3 s
        time.sleep(0.5)  # let it reach the sidecar, even on a loaded box
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started > 1.0  # it waited for the request in flight...
        with pytest.raises(NoHostAvailable, match="walcar busy"):  # ...which got its real answer
            waiting.result()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    finally:
        c.shutdown()
        server.stop()


def test_an_app_vanishing_mid_request_does_not_hurt_the_server(sidecar: CqlSidecar, session: Session) -> None:
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
        _handshake(sock)
        query = encode_request(Query("SELECT * FROM system_schema.columns", QueryParameters(1)), 5)
        sock.sendall(query * 50)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        sock.close()
    time.sleep(0.5)
    assert session.execute("SELECT release_version FROM system.local").one() is not None
    assert len(list(session.execute("SELECT * FROM system_schema.keyspaces"))) > 3


# --------------------------------------------------------------------------- cqlsh


def test_cqlsh_describe_insert_select(sidecar: CqlSidecar, ks: str, namespace: str, services: Services,
                                      cassandra_session: Session) -> None:
    cassandra_session.execute(f"INSERT INTO {ks}.kv (k, c, v) VALUES (60, 1, 'seeded directly')")
    script = (f"DESCRIBE KEYSPACES; DESCRIBE TABLE {ks}.kv; "
              f"INSERT INTO {ks}.kv (k, c, v) VALUES (61, 1, 'via cqlsh'); "
              f"SELECT k, c, v FROM {ks}.kv WHERE k = 60;")
    proc = subprocess.run(
        ["cqlsh", "127.0.0.1", str(sidecar.port), "-u", "cassandra", "-p", "cassandra", "-e", script],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ks in out and "system_schema" in out
    assert f"CREATE TABLE {ks}.kv (" in out and "PRIMARY KEY (k, c)" in out
    assert "seeded directly" in out and "(1 rows)" in out
    entries = [e for _, e in journal(services.nats_url, namespace) if e.key == f"{ks}.kv:{int32(61).hex()}"]
    assert len(entries) == 1 and entries[0].cql is not None
    assert entries[0].cql.statements[0].query.startswith(f"INSERT INTO {ks}.kv")


# --------------------------------------------------------------------------- fuzzing through the server


def _exchange(port: int, payload: bytes, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
    """Send bytes, half-close, and read (opcode, stream, body) frames until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    frames = []
    while data:
        version = data[0] & 0x7F
        size = 8 if version in (1, 2) else 9
        assert data[0] & 0x80 and len(data) >= size, f"not a response frame: {data[:16]!r}"
        if size == 8:
            _, _, stream, opcode, length = struct.unpack(">BBbBi", data[:8])
        else:
            _, _, stream, opcode, length = struct.unpack(">BBhBi", data[:9])
        body = data[size:size + length]
        assert len(body) == length, "truncated response frame"
        frames.append((opcode, stream, body))
        data = data[size + length:]
    return frames


def _error_code(body: bytes) -> int:
    return struct.unpack(">i", body[:4])[0]


request_frames = st.builds(
    lambda version, flags, stream, opcode, body: struct.pack(">BBhBi", version, flags, stream, opcode, len(body))
    + body,
    st.sampled_from([4, 4, 4, 1, 2, 3, 5, 0x42, 0x84]),
    st.sampled_from([0, 0, 1, 2, 4, 8, 0x10]),
    st.integers(0, 32767),
    st.sampled_from([0, 1, 5, 7, 9, 10, 11, 13, 15, 2, 8, 99]),
    st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=request_frames, garbage=st.binary(max_size=32))
def test_fuzzed_frames_never_crash_the_server_and_malformed_ones_get_protocol_errors(
    sidecar: CqlSidecar, frame: bytes, garbage: bytes
) -> None:
    version, flags, stream, opcode, _ = struct.unpack(">BBhBi", frame[:9])
    replies = _exchange(sidecar.port, frame)
    for reply_opcode, _, body in replies:
        if reply_opcode == 0x00:  # ERROR
            assert _error_code(body) == ErrorCode.PROTOCOL_ERROR
        else:  # before the handshake only a well-formed OPTIONS / STARTUP gets anything but an error
            assert version == 4 and opcode in (1, 5) and reply_opcode in (0x03, 0x06)  # AUTHENTICATE, SUPPORTED
    if version != 4 or opcode not in (1, 5):
        assert [r[0] for r in replies] == [0x00]  # wrong version, or a request before STARTUP
    elif not flags & 1:
        try:
            decode_request(CqlFrame(version, flags, stream, opcode, frame[9:]))
        except CqlProtocolError:
            assert [r[0] for r in replies] == [0x00]  # malformed: ProtocolError
    # Trailing garbage only ever costs protocol errors (or answers to whatever frames it happens to hold).
    for reply_opcode, _, body in _exchange(sidecar.port, frame + garbage):
        assert reply_opcode != 0x00 or _error_code(body) == ErrorCode.PROTOCOL_ERROR


def _handshake(sock: socket.socket) -> FrameDecoder:
    decoder = FrameDecoder()
    seen: list[int] = []
    for stream, message in enumerate((Options(), Startup({"CQL_VERSION": "3.4.7"}),
                                      AuthResponse(b"\x00cassandra\x00cassandra"))):
        sock.sendall(encode_request(message, stream))
        while len(seen) <= stream:
            seen.extend(frame.opcode for frame in decoder.feed(sock.recv(65536)))
    assert seen == [0x06, 0x03, 0x10]  # SUPPORTED, AUTHENTICATE, AUTH_SUCCESS
    return decoder


_VALID = [
    (7, encode_request_body(Query("SELECT release_version FROM system.local", QueryParameters(1)))),
    (7, encode_request_body(Query("SELECT * FROM system_schema.keyspaces", QueryParameters(1, page_size=2)))),
    (9, encode_request_body(Prepare("SELECT * FROM system.peers"))),
    (10, encode_request_body(Execute(b"\x01" * 16, QueryParameters(1, values=[b"\x00\x00\x00\x01", None])))),
    (13, encode_request_body(Batch(0, [BatchStatement(query="INSERT INTO nowhere.t (k) VALUES (?)",
                                                      values=[b"\x00"])], 1))),
    (11, encode_request_body(Register(["SCHEMA_CHANGE"]))),
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[int, bytes]:
    """A valid request body, truncated or with a few bytes flipped: malformed in the ways that matter."""
    opcode, body = draw(st.sampled_from(_VALID))
    if draw(st.booleans()):
        return opcode, body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return opcode, bytes(data)


random_requests = st.tuples(st.sampled_from([7, 9, 10, 11, 13]), st.binary(max_size=80))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=st.one_of(random_requests, mutated_requests()), flags=st.sampled_from([0, 0, 2, 4]))
def test_fuzzed_requests_after_the_handshake_are_answered_and_the_connection_survives(
    sidecar: CqlSidecar, request: tuple[int, bytes], flags: int
) -> None:
    opcode, body = request
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        decoder = _handshake(sock)
        sock.sendall(struct.pack(">BBhBi", 4, flags, 77, opcode, len(body)) + body)
        sock.sendall(encode_request(Options(), 78))
        answers: dict[int, int] = {}
        while not {77, 78} <= answers.keys():  # 77 may be forwarded to Cassandra and come back after 78
            for frame in decoder.feed(sock.recv(65536)):
                answers[frame.stream] = frame.opcode
        assert answers[78] == 0x06  # the connection still works
        assert 77 in answers and answers[77] in (0x00, 0x02, 0x08)  # ERROR, READY (REGISTER) or RESULT
        try:
            decode_request(CqlFrame(4, flags, 77, opcode, body))
        except CqlProtocolError:
            assert answers[77] == 0x00
