"""walcar against a TLS-only nats-server that verifies client certificates (mTLS), as production runs it.

Every certificate is made here (tests/support/pki.py). A wrong CA, an expired server
certificate and a missing client certificate each stop `walcar run` with an error naming
what to fix; rotated files are picked up at the next reconnect without a restart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomli_w
import trio

from sidecar import config as config_mod
from sidecar.log.link import NatsLink
from sidecar.log.service import open_journal
from sidecar.tls import ClientTls, TlsError
from tests.support.natsconf import tls_nats
from tests.support.pki import Authority, issue, make_ca
from tests.support.procs import NatsProcess, wait_for
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document
from tests.support.waiting import until


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_ca("walcar-nats-ca")


@pytest.fixture
def mtls_nats(tmp_path: Path, ca: Authority, services) -> NatsProcess:
    server = tls_nats(tmp_path / "nats", ca, verify=True)
    server.start()
    yield server
    server.stop()


def client_files(ca: Authority, tmp_path: Path, name: str = "client") -> dict[str, str]:
    pair = issue(ca, tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem", common_name="walcar", client=True)
    return {"ca_file": str(ca.write(tmp_path / f"{name}-ca.pem")), "cert_file": str(pair.cert),
            "key_file": str(pair.key)}


def run_walcar(tmp_path: Path, document: dict) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "walcar.toml"
    path.write_text(tomli_w.dumps(document))
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "run", "--config", str(path), "--connect-retry", "1"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_walcar_journals_and_drains_through_mtls_nats(mtls_nats: NatsProcess, ca: Authority, tmp_path: Path,
                                                      services, unique: str) -> None:
    """Both NATS connections (nats-py for streams and consumers, the link for writes and pulls) over mTLS."""
    listener = kv_listener()
    cache = f"{services.memcached[0]}:{services.memcached[1]}"
    document = sidecar_document(
        f"tls://localhost:{mtls_nats.port}",
        {unique: {"mode": "sync", "partitions": 2, "targets": [{"name": "cache", "type": "memcached",
                                                               "servers": [cache]}]}},
        [listener], nats_tls=client_files(ca, tmp_path))
    walcar = SidecarProcess(document, tmp_path / "walcar").start()
    try:
        with httpx.Client(base_url=f"http://{listener['bind']}", timeout=10) as client:
            put = client.put(f"/v1/kv/{unique}/user-1", json={"items": [{"key": "name", "text": "ada"}]})
            assert put.status_code == 200 and put.json()["durable"] == "true", put.text
            wait_for(lambda: client.get(f"/v1/kv/{unique}/user-1?items=name").status_code == 200, 30,
                     what="the write to be drained")  # pulled and acked through the link, applied
            got = client.get(f"/v1/kv/{unique}/user-1?items=name")
            assert got.status_code == 200 and got.json()["items"][0]["value"] == "YWRh"  # base64 of "ada"
    finally:
        walcar.stop()
    assert "Traceback" not in walcar.log()


def test_a_wrong_ca_stops_walcar_with_an_error_naming_the_setting(mtls_nats: NatsProcess, ca: Authority,
                                                                  tmp_path: Path) -> None:
    files = client_files(ca, tmp_path)
    files["ca_file"] = str(make_ca("someone-else").write(tmp_path / "other-ca.pem"))
    result = run_walcar(tmp_path, sidecar_document(f"nats://localhost:{mtls_nats.port}", {}, nats_tls=files))
    assert result.returncode != 0
    assert "failed verification" in result.stderr and "sidecar.nats_tls.ca_file" in result.stderr, result.stderr


def test_an_expired_server_certificate_stops_walcar(tmp_path: Path, ca: Authority, services) -> None:
    server = tls_nats(tmp_path / "nats", ca, verify=False, expired=True)
    server.start()
    try:
        result = run_walcar(tmp_path, sidecar_document(f"nats://localhost:{server.port}", {},
                                                       nats_tls=client_files(ca, tmp_path)))
    finally:
        server.stop()
    assert result.returncode != 0
    assert "certificate has expired" in result.stderr, result.stderr


def test_a_missing_client_certificate_stops_walcar(mtls_nats: NatsProcess, ca: Authority, tmp_path: Path) -> None:
    result = run_walcar(tmp_path, sidecar_document(f"nats://localhost:{mtls_nats.port}", {},
                                                   nats_tls={"ca_file": str(ca.write(tmp_path / "ca.pem"))}))
    assert result.returncode != 0
    assert "client certificate" in result.stderr, result.stderr


def test_an_expired_client_certificate_stops_walcar(mtls_nats: NatsProcess, ca: Authority, tmp_path: Path) -> None:
    files = client_files(ca, tmp_path)
    issue(ca, Path(files["cert_file"]), Path(files["key_file"]), common_name="walcar", client=True, expired=True)
    result = run_walcar(tmp_path, sidecar_document(f"nats://localhost:{mtls_nats.port}", {}, nats_tls=files))
    assert result.returncode != 0
    assert "client certificate" in result.stderr, result.stderr


def test_a_missing_file_is_named_before_anything_connects(tmp_path: Path) -> None:
    result = run_walcar(tmp_path, sidecar_document("nats://localhost:1", {},
                                                   nats_tls={"ca_file": str(tmp_path / "nope.pem")}))
    assert result.returncode != 0
    assert f"sidecar.nats_tls.ca_file: {tmp_path / 'nope.pem'}: no such file" in result.stderr, result.stderr
    with pytest.raises(TlsError, match="key does not match"):
        pair = issue(make_ca(), tmp_path / "a.pem", tmp_path / "a-key.pem")
        other = issue(make_ca(), tmp_path / "b.pem", tmp_path / "b-key.pem")
        ClientTls("sidecar.nats_tls", None, str(pair.cert), str(other.key))


def test_tls_is_never_given_up_for_plain_text(private_nats: NatsProcess, ca: Authority, tmp_path: Path) -> None:
    """TLS configured and a server that offers none: refused, not silently sent in clear."""
    result = run_walcar(tmp_path, sidecar_document(private_nats.url, {}, nats_tls=client_files(ca, tmp_path)))
    assert result.returncode != 0


async def test_rotated_client_certificate_is_used_at_the_next_connect(mtls_nats: NatsProcess, ca: Authority,
                                                                      tmp_path: Path) -> None:
    """The link keeps retrying with a certificate the server refuses; the Secret is updated; it gets in."""
    files = client_files(make_ca("stale"), tmp_path)
    ca.write(Path(files["ca_file"]))  # trusts the server; presents a certificate the server does not trust
    tls = ClientTls("sidecar.nats_tls", files["ca_file"], files["cert_file"], files["key_file"])
    link = NatsLink(f"nats://localhost:{mtls_nats.port}", tls=tls)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await until(lambda: "client certificate" in link.last_error, 10, "the refusal")
        assert not link.connected
        issue(ca, Path(files["cert_file"]), Path(files["key_file"]), common_name="walcar", client=True)
        await until(lambda: link.connected, 10, "the link to connect with the rotated certificate")
        nursery.cancel_scope.cancel()


async def test_both_connections_reconnect_with_a_rotated_ca_and_certificates(ca: Authority, tmp_path: Path,
                                                                             services, unique: str) -> None:
    """The whole PKI is replaced (new CA, new server and client certificates) while walcar runs."""
    server = tls_nats(tmp_path / "nats", ca)
    server.start()
    files = client_files(ca, tmp_path)
    config = config_mod.validate(sidecar_document(f"nats://localhost:{server.port}", {unique: {"partitions": 1}},
                                                  nats_tls=files))
    try:
        async with open_journal(config, connect_retry=5.0) as journal:
            conn, link = journal.writer.conn, journal.writer.conn.link
            assert link is not None
            server.stop()
            await until(lambda: not conn.connected and not link.connected, 10, "both connections to notice")
            rotated = make_ca("walcar-nats-ca-2")
            issue(rotated, Path(files["cert_file"]), Path(files["key_file"]), common_name="walcar", client=True)
            rotated.write(Path(files["ca_file"]))
            server = tls_nats(tmp_path / "nats", rotated, port=server.port)
            server.start()
            await until(lambda: conn.connected and link.connected, 20, "both connections back with the new PKI")
            ack = await conn.js_api(f"STREAM.INFO.{config_mod.stream_name(unique)}")
            assert ack["config"]["name"] == config_mod.stream_name(unique)
    finally:
        server.stop()



async def test_handshake_first_servers_with_both_connections(ca: Authority, tmp_path: Path, services,
                                                             unique: str) -> None:
    """nats-server `tls { handshake_first: true }`: TLS before INFO, for nats-py and the link alike."""
    server = tls_nats(tmp_path / "nats", ca, handshake_first=True)
    server.start()
    try:
        files = {**client_files(ca, tmp_path), "handshake_first": True, "server_name": "localhost"}
        config = config_mod.validate(sidecar_document(f"nats://127.0.0.1:{server.port}",
                                                      {unique: {"partitions": 1}}, nats_tls=files))
        async with open_journal(config, connect_retry=5.0) as journal:
            link = journal.writer.conn.link
            assert link is not None
            await until(lambda: link.connected, 10, "the link")
            info = await journal.writer.conn.js_api(f"STREAM.INFO.{config_mod.stream_name(unique)}")
            assert info["config"]["name"] == config_mod.stream_name(unique)
    finally:
        server.stop()
