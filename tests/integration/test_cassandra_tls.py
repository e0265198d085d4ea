"""walcar end to end against TLS-only NATS (mTLS) and a TLS-only Cassandra (client_encryption_options).

One Cassandra node for the module (tests/support/cassandra_tls.py), first with
require_client_auth: true; the last test restarts it with require_client_auth: false.
The drain target, the CQL front's upstream connections and replay/verify all speak TLS to it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from sidecar.config import CassandraTarget, CassandraTls
from sidecar.drain.targets.base import ApplyError
from sidecar.drain.targets.cassandra import CassandraTarget as CassandraDrainTarget
from sidecar.tls import TlsError
from sidecar.units import Duration
from tests.support.cassandra import driver_cluster
from tests.support.cassandra_tls import tls_cassandra
from tests.support.natsconf import tls_nats
from tests.support.pki import Authority, issue, make_ca
from tests.support.procs import CassandraProcess, NatsProcess, free_port, services_module, wait_for
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document

ROOT = Path(__file__).resolve().parents[2]
PASSWORD_FILE = ROOT / "examples" / "cassandra.password"


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_ca("walcar-cassandra-ca")


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, ca: Authority, services) -> Iterator[CassandraProcess]:
    node = tls_cassandra(tmp_path_factory.mktemp("cassandra-tls"), ca, require_client_auth=True)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def client_tls(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> dict[str, str]:
    where = tmp_path_factory.mktemp("client")
    pair = issue(ca, where / "walcar.pem", where / "walcar-key.pem", common_name="walcar", client=True)
    return {"ca_file": str(ca.write(where / "ca.pem")), "cert_file": str(pair.cert), "key_file": str(pair.key)}


@pytest.fixture
def mtls_nats(tmp_path: Path, ca: Authority, services) -> Iterator[NatsProcess]:
    server = tls_nats(tmp_path / "nats", ca, verify=True)
    server.start()
    yield server
    server.stop()


def target(port: int, keyspace: str, tls: dict[str, object] | None, name: str = "db") -> dict[str, object]:
    return {"name": name, "type": "cassandra", "contact_points": [f"127.0.0.1:{port}"], "keyspace": keyspace,
            "username": "cassandra", "password_file": str(PASSWORD_FILE), "consistency": "ONE", "timeout": "5s",
            **({"tls": tls} if tls is not None else {})}


def test_walcar_end_to_end_over_tls_only_nats_and_cassandra(tls_node: CassandraProcess, mtls_nats: NatsProcess,
                                                            client_tls: dict[str, str], tmp_path: Path,
                                                            unique: str) -> None:
    """KV writes drained to Cassandra, CQL through the front (its upstream over TLS), then replay and verify."""
    keyspace = f"ks_{unique}"
    kv, cql_port = kv_listener(), free_port()
    document = sidecar_document(
        f"nats://localhost:{mtls_nats.port}",
        {unique: {"mode": "sync", "partitions": 2, "targets": [target(tls_node.port, keyspace, client_tls)]}},
        [kv, {"protocol": "cql", "bind": f"127.0.0.1:{cql_port}", "namespace": unique}],
        nats_tls=client_tls)
    walcar = SidecarProcess(document, tmp_path / "walcar").start(timeout=60)
    try:
        with httpx.Client(base_url=f"http://{kv['bind']}", timeout=15) as client:
            for i in range(5):
                put = client.put(f"/v1/kv/{unique}/user-{i}", json={"items": [{"key": "name", "text": f"n{i}"}]})
                assert put.status_code == 200 and put.json()["durable"] == "true", put.text
            # drained, then read back through the TLS-only target
            wait_for(lambda: client.get(f"/v1/kv/{unique}/user-4?items=name").status_code == 200, 30,
                     what="the writes to reach Cassandra")
            got = client.get(f"/v1/kv/{unique}/user-3?items=name")
            assert got.status_code == 200 and got.json()["items"][0]["value"] == "bjM=", got.text  # "n3"
        cluster = driver_cluster(cql_port)  # the app speaks plain CQL to its local front
        try:
            session = cluster.connect()
            session.execute(f"CREATE TABLE {keyspace}.orders (id int PRIMARY KEY, total int)")
            session.execute(f"INSERT INTO {keyspace}.orders (id, total) VALUES (1, 42)")
            select = f"SELECT total FROM {keyspace}.orders WHERE id = 1"
            wait_for(lambda: [r.total for r in session.execute(select)] == [42], 30,
                     what="the INSERT, journaled then drained over TLS, to be read back upstream")
        finally:
            cluster.shutdown()
    finally:
        walcar.stop()
    assert "Traceback" not in walcar.log()

    config = tmp_path / "walcar" / "walcar.toml"
    tls_args = ["--tls-ca", client_tls["ca_file"], "--tls-cert", client_tls["cert_file"],
                "--tls-key", client_tls["key_file"]]
    to = ["--to-cassandra", f"127.0.0.1:{tls_node.port}", "--keyspace", f"{keyspace}", "--table", "copy",
          "--username", "cassandra", "--password-file", str(PASSWORD_FILE), "--consistency", "ONE"]
    session_setup = driver_cluster(tls_node.port, ssl_context=_context(client_tls))
    try:
        session_setup.connect().execute(
            f"CREATE TABLE {keyspace}.copy (id text, key text, value blob, PRIMARY KEY (id, key))")
    finally:
        session_setup.shutdown()
    for command in ("replay", "verify"):
        result = subprocess.run([sys.executable, "-m", "sidecar.cli", command, "--config", str(config),
                                 "--namespace", unique, *to, *tls_args], capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"


def _context(files: dict[str, str]):
    import ssl

    context = ssl.create_default_context(cafile=files["ca_file"])
    if "cert_file" in files:
        context.load_cert_chain(files["cert_file"], files["key_file"])
    return context


async def drain_target(port: int, keyspace: str, tls: CassandraTls | None) -> CassandraDrainTarget:
    settings = CassandraTarget(name="db", contact_points=[f"127.0.0.1:{port}"], keyspace=keyspace,
                               username="cassandra", password_file=str(PASSWORD_FILE), consistency="ONE",
                               timeout=Duration(3.0), create_schema=False, tls=tls)
    return CassandraDrainTarget(settings, "ns")


async def test_without_a_client_certificate_the_target_is_refused(tls_node: CassandraProcess,
                                                                  client_tls: dict[str, str]) -> None:
    db = await drain_target(tls_node.port, "system", CassandraTls(ca_file=client_tls["ca_file"]))
    with pytest.raises(ApplyError, match="cannot connect to Cassandra"):
        await db.health()
    await db.close()


async def test_a_wrong_ca_is_named_in_the_error(tls_node: CassandraProcess, client_tls: dict[str, str],
                                                tmp_path: Path) -> None:
    other = str(make_ca("other").write(tmp_path / "other.pem"))
    db = await drain_target(tls_node.port, "system", CassandraTls(ca_file=other, cert_file=client_tls["cert_file"],
                                                                 key_file=client_tls["key_file"]))
    with pytest.raises(ApplyError, match="certificate verify failed"):
        await db.health()
    await db.close()


def test_a_missing_tls_file_fails_at_startup_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"db.tls.cert_file: .*: no such file"):
        CassandraDrainTarget(CassandraTarget(name="db", contact_points=["127.0.0.1:1"], keyspace="k",
                                             tls=CassandraTls(cert_file=str(tmp_path / "absent.pem"),
                                                              key_file=str(tmp_path / "absent.key"))), "ns")


async def test_a_renewed_client_certificate_is_used_without_a_restart(tls_node: CassandraProcess, ca: Authority,
                                                                      client_tls: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """The target starts with a certificate the node refuses; the Secret is renewed; the next try gets in."""
    stale = issue(make_ca("stale"), tmp_path / "c.pem", tmp_path / "k.pem", common_name="walcar", client=True)
    db = await drain_target(tls_node.port, "system", CassandraTls(ca_file=client_tls["ca_file"],
                                                                 cert_file=str(stale.cert), key_file=str(stale.key)))
    try:
        with pytest.raises(ApplyError):
            await db.health()
        issue(ca, stale.cert, stale.key, common_name="walcar", client=True)  # what cert-manager does
        await db.health()
    finally:
        await db.close()


async def test_with_require_client_auth_false_the_ca_alone_is_enough(tls_node: CassandraProcess, ca: Authority,
                                                                     client_tls: dict[str, str]) -> None:
    """Runs last: the node is restarted with require_client_auth: false."""
    tls_node.stop()
    workdir = tls_node.workdir.parent
    tls_node.extra_yaml = services_module().client_encryption_yaml(
        workdir / "keystore.pem", workdir / "truststore.pem", False)
    tls_node.ready_context = _context({"ca_file": client_tls["ca_file"]})
    await trio.to_thread.run_sync(tls_node.start)
    db = await drain_target(tls_node.port, "system", CassandraTls(ca_file=client_tls["ca_file"]))
    try:
        await db.health()
    finally:
        await db.close()
    plain = await drain_target(tls_node.port, "system", None)  # TLS-only: plain text is refused
    with pytest.raises(ApplyError):
        await plain.health()
    await plain.close()
