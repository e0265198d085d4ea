"""The whole CQL story against a Cassandra that goes away: an app keeps writing, nothing is lost.

An app connects with cassandra-driver to the sidecar only, creates its schema and
prepares an insert; Cassandra stops; the app writes 10k rows, each acked with
`walcar-durable: true`; Cassandra comes back; the drain lands every row with WRITETIME
equal to its journaled timestamp; applying the same journal entries again changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import trio
from cassandra.policies import ConstantReconnectionPolicy

from sidecar import config as config_mod
from sidecar.config import stream_name
from sidecar.drain.targets.cassandra import CassandraTarget
from tests.support.cassandra import driver_cluster
from tests.support.procs import CassandraProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, sidecar_document
from tests.support.streams import read_stream

ROWS = 10_000
PASSWORD_FILE = Path(__file__).resolve().parents[2] / "examples" / "cassandra.password"


def table_state(port: int, keyspace: str) -> dict[str, tuple[str, int]]:
    cluster = driver_cluster(port)
    try:
        session = cluster.connect()
        rows = session.execute(f"SELECT id, body, WRITETIME(body) AS wt FROM {keyspace}.events")
        return {row.id: (row.body, row.wt) for row in rows}
    finally:
        cluster.shutdown()


async def test_app_writes_through_a_cassandra_outage(services: Services, private_cassandra: CassandraProcess,
                                                     tmp_path: Path, unique: str) -> None:
    keyspace = f"app_{unique}"
    cql_port = free_port()
    target = {"name": "db", "type": "cassandra", "contact_points": [f"127.0.0.1:{private_cassandra.port}"],
              "keyspace": keyspace, "username": "cassandra", "password_file": str(PASSWORD_FILE),
              "consistency": "ONE", "timeout": "2s", "create_schema": False}
    document = sidecar_document(
        services.nats_url,
        {unique: {"partitions": 8, "retry": {"initial_delay": "50ms", "max_delay": "1s"}, "targets": [target]}},
        [{"protocol": "cql", "bind": f"127.0.0.1:{cql_port}", "namespace": unique}],
        drain={"lease_ttl": "2s"},
    )
    sidecar = SidecarProcess(document, tmp_path / "sidecar").start()
    cluster = driver_cluster(cql_port, reconnection_policy=ConstantReconnectionPolicy(0.5))
    try:
        session = cluster.connect()
        assert [host.endpoint.port for host in cluster.metadata.all_hosts()] == [cql_port]
        session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = "
                        "{'class': 'SimpleStrategy', 'replication_factor': 1}")
        session.execute(f"CREATE TABLE {keyspace}.events (id text PRIMARY KEY, body text)")
        insert = session.prepare(f"INSERT INTO {keyspace}.events (id, body) VALUES (?, ?)")

        await trio.to_thread.run_sync(private_cassandra.stop)

        def write_all() -> list[str]:
            flags = []
            futures = []
            for i in range(ROWS):
                futures.append(session.execute_async(insert, (f"e{i}", f"body-{i}")))
                if len(futures) >= 256:
                    for future in futures:
                        future.result()
                        flags.append(future.custom_payload.get("walcar-durable", b"").decode())
                    futures = []
            for future in futures:
                future.result()
                flags.append(future.custom_payload.get("walcar-durable", b"").decode())
            return flags

        flags = await trio.to_thread.run_sync(write_all)
        assert len(flags) == ROWS and set(flags) == {"true"}

        await trio.to_thread.run_sync(private_cassandra.start)
        journaled = {}
        for message in await read_stream(services.nats_url, stream_name(unique)):
            entry = message.entry()
            journaled[entry.cql.statements[0].values[0].decode()] = entry
        assert len(journaled) == ROWS
        expected = {key: (f"body-{key[1:]}", entry.write_time) for key, entry in journaled.items()}

        state: dict[str, tuple[str, int]] = {}
        for _ in range(240):
            state = await trio.to_thread.run_sync(table_state, private_cassandra.port, keyspace)
            if state == expected:
                break
            await trio.sleep(0.5)
        assert len(state) == ROWS, sidecar.log()[-3000:]
        assert state == expected  # every row, with WRITETIME = the journaled timestamp

        # Replaying the same entries through the same adapter changes nothing.
        settings = config_mod.validate({"namespaces": {unique: {"targets": [target]}}})
        adapter = CassandraTarget(settings.namespaces[unique].targets[0], unique)  # type: ignore[arg-type]
        await adapter.start()
        try:
            runs = [[entry] for entry in journaled.values()]
            for start in range(0, len(runs), 500):
                outcomes = await adapter.apply(runs[start : start + 500])
                assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error][:3]
        finally:
            await adapter.close()
        assert await trio.to_thread.run_sync(table_state, private_cassandra.port, keyspace) == expected
    finally:
        cluster.shutdown()
        sidecar.stop()
