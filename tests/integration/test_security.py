"""Issue 17's table, re-run against a real sidecar: every door that stood open is now shut.

Each test tries what an attacker in the pod or the cluster tried (no credential, a
browser's request, a request naming a URL or a file, a forged cross-region batch, a
header smuggled in a token, a password in a URL) and asserts both the refusal and
that nothing changed: no pause, no purge, no shutdown, no request to the attacker's
URL, no file written, no entry journaled, no table dropped, no secret in any log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from sidecar.config import stream_name
from sidecar.envelope import CqlMutation, CqlStatement, Entry, Op, now_us
from tests.integration.test_drain import DRAIN, cassandra_target, memcached_target
from tests.support.procs import free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, kv_listener, secret_file, sidecar_document
from tests.support.streams import stream_state

PASSWORD = "pw-never-in-a-log-7f3c"


def sidecar_with_token(services: Services, tmp_path: Path, unique: str, nats_url: str | None = None,
                       **settings: object) -> SidecarProcess:
    token = secret_file(tmp_path / "admin.token", "adm-" + unique)
    namespaces = {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached)]}}
    document = sidecar_document(nats_url or services.nats_url, namespaces, [kv_listener()], drain=DRAIN,
                                admin_token_file=str(token), **settings)
    return SidecarProcess(document, tmp_path / "walcar").start()


def test_admin_beyond_loopback_without_a_token_refuses_to_start(services: Services, tmp_path: Path,
                                                               unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 1}}, [],
                                admin=f"0.0.0.0:{free_port()}")
    process = SidecarProcess(document, tmp_path / "walcar")
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "run", "--config", str(process.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "sidecar.admin" in result.stderr and "admin_token_file" in result.stderr
    document["listeners"] = [{"protocol": "kv", "bind": f"0.0.0.0:{free_port()}"}]
    document["sidecar"]["admin"] = f"127.0.0.1:{free_port()}"
    process = SidecarProcess(document, tmp_path / "walcar2")
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "config", "check", str(process.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "token_file" in result.stderr


def test_admin_mutations_and_value_reads_need_the_token(services: Services, tmp_path: Path, unique: str) -> None:
    process = sidecar_with_token(services, tmp_path, unique)
    admin = process.admin
    try:
        for path in (f"/v1/drain/{unique}/cache/pause", f"/v1/dlq/{unique}/purge", "/v1/shutdown",
                     f"/v1/dlq/{unique}/replay", "/v1/replay"):
            assert httpx.post(f"{admin}{path}", json={}).status_code == 401, path
        for path in ("/v1/config", f"/v1/dlq/{unique}", f"/v1/dlq/{unique}/1"):
            assert httpx.get(f"{admin}{path}").status_code == 401, path
        # a browser form (text/plain, with the token even) and any request with an Origin are refused
        bearer = {"authorization": f"Bearer adm-{unique}"}
        form = httpx.post(f"{admin}/v1/drain/{unique}/cache/pause", content=b"x",
                          headers={**bearer, "content-type": "text/plain"})
        assert form.status_code == 415
        browser = httpx.post(f"{admin}/v1/drain/{unique}/cache/pause", json={},
                             headers={**bearer, "origin": "http://evil.example"})
        assert browser.status_code == 403
        # nothing changed: not paused, still serving
        assert process.target_status("cache")["state"] != "paused"
        assert process.proc is not None and process.proc.poll() is None
        # the open routes stay open (no values there)
        assert httpx.get(f"{admin}/readyz").status_code == 200
        assert httpx.get(f"{admin}/v1/drain").status_code == 200
        assert httpx.get(f"{admin}/v1/config", headers=bearer).status_code == 200
    finally:
        process.stop()


def test_the_kv_api_refuses_what_a_web_page_could_send(services: Services, tmp_path: Path, unique: str) -> None:
    listener = kv_listener()
    process = SidecarProcess(sidecar_document(services.nats_url, {unique: {"partitions": 1}}, [listener]),
                             tmp_path / "w").start()
    url = f"http://{listener['bind']}"
    try:
        body = b'{"key": "csrf", "text": "x"}'
        simple = httpx.post(f"{url}/v1/log/{unique}", content=body, headers={"content-type": "text/plain"})
        assert simple.status_code == 415  # what a form or a no-cors fetch can send
        cross = httpx.post(f"{url}/v1/log/{unique}", json={"key": "csrf", "text": "x"},
                           headers={"origin": "http://evil.example"})
        assert cross.status_code == 403
        rebound = httpx.get(f"{url}/v1/kv/{unique}/csrf", headers={"host": "rebind.evil.example"})
        assert rebound.status_code == 403  # a rebound name cannot read values either
        assert trio.run(stream_state, services.nats_url, stream_name(unique))["messages"] == 0
    finally:
        process.stop()


def test_without_a_token_admin_serves_only_loopback_hosts_and_never_a_browser(services: Services, tmp_path: Path,
                                                                           unique: str) -> None:
    namespaces = {unique: {"partitions": 1, "targets": [memcached_target("cache", services.memcached)]}}
    document = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "walcar").start()
    try:
        pause = f"{process.admin}/v1/drain/{unique}/cache/pause"
        # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1
        assert httpx.post(pause, json={}, headers={"host": "evil.example:9901"}).status_code == 403
        assert httpx.post(pause, json={}, headers={"origin": "http://127.0.0.1"}).status_code == 403
        assert httpx.post(pause, data={"a": "b"}).status_code == 415  # a form post
        assert process.target_status("cache")["state"] != "paused"
    finally:
        process.stop()


class Listener:
    """A TCP port that records whether anyone connected (the attacker's URL)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def test_admin_replay_cannot_name_a_url_a_token_file_or_a_checkpoint(services: Services, tmp_path: Path,
                                                                     unique: str) -> None:
    process = sidecar_with_token(services, tmp_path, unique)
    attacker = Listener()
    victim = secret_file(tmp_path / "victim.txt", "do-not-overwrite-" + unique)
    bearer = {"authorization": f"Bearer adm-{unique}"}
    try:
        leak = {"namespace": unique, "target_config": {"type": "wal", "name": "x",
                                                       "url": f"http://127.0.0.1:{attacker.port}",
                                                       "token_file": str(process.config_path)}}
        answer = httpx.post(f"{process.admin}/v1/replay", json=leak, headers=bearer)
        assert answer.status_code == 400 and "target_config" in answer.json()["error"]
        overwrite = {"namespace": unique, "target": "cache", "checkpoint": str(victim)}
        answer = httpx.post(f"{process.admin}/v1/replay", json=overwrite, headers=bearer)
        assert answer.status_code == 400 and "checkpoint" in answer.json()["error"]
        time.sleep(1)
        assert attacker.connections == 0
        assert victim.read_text() == f"do-not-overwrite-{unique}\n"
        # a configured target by name is what the admin API takes
        ok = httpx.post(f"{process.admin}/v1/replay", json={"namespace": unique, "target": "cache"}, headers=bearer)
        assert ok.status_code == 202, ok.text
    finally:
        attacker.close()
        process.stop()


def replicated(entry: Entry) -> bytes:
    return msgspec.msgpack.encode({"entries": [entry]})


def entry(namespace: str, **fields: object) -> Entry:
    base: dict[str, object] = {"id": f"e-{time.monotonic_ns()}", "ns": namespace, "op": Op.PUT, "key": "k",
                               "partition": 0, "value": b"v", "write_time": now_us(), "origin": "far-away"}
    return Entry(**{**base, **fields})  # type: ignore[arg-type]


def post_batch(url: str, namespace: str, body: bytes, token: str | None) -> httpx.Response:
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(f"{url}/v1/log/{namespace}/batch", content=body, headers=headers, timeout=30)


def test_cross_region_batches_need_the_region_token_and_pass_the_front_door(
        services: Services, cassandra_session, keyspace: str, tmp_path: Path, unique: str) -> None:
    cassandra_session.execute(f"CREATE TABLE {keyspace}.t (k text PRIMARY KEY, v text)")
    namespaces = {unique: {"partitions": 2, "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}}
    listener = kv_listener()
    document = sidecar_document(services.nats_url, namespaces, [listener], drain=DRAIN, region="here")
    process = SidecarProcess(document, tmp_path / "open").start()
    url = f"http://{listener['bind']}"
    drop = entry(unique, op=Op.CQL, value=None, cql=CqlMutation([CqlStatement(f"DROP TABLE {keyspace}.t")]))
    try:
        off = post_batch(url, unique, replicated(drop), None)
        assert off.status_code == 403 and "region_token_file" in off.text
    finally:
        process.stop()

    token = secret_file(tmp_path / "region.token", "rgn-" + unique)
    listener = {**kv_listener(), "max_body": "24MiB", "partial_budget": "48MiB"}  # room for the 17 MB entry
    document = sidecar_document(services.nats_url, namespaces, [listener], drain=DRAIN, region="here",
                                region_token_file=str(token))
    process = SidecarProcess(document, tmp_path / "guarded").start()
    url = f"http://{listener['bind']}"
    try:
        assert post_batch(url, unique, replicated(drop), "wrong").status_code == 401
        refusals = {
            "drop table": drop,
            "truncate": entry(unique, op=Op.CQL, value=None,
                              cql=CqlMutation([CqlStatement(f"TRUNCATE {keyspace}.t")])),
            "grant": entry(unique, op=Op.CQL, value=None,
                           cql=CqlMutation([CqlStatement("GRANT ALL ON ALL KEYSPACES TO app")])),
            "50 years ahead": entry(unique, write_time=now_us() + 50 * 365 * 86400 * 10**6),
            "17 MB": entry(unique, value=b"x" * (17 * 1024 * 1024)),
            "our own origin": entry(unique, origin="here"),
            "header in the id": entry(unique, id="abc\r\nNats-Expected-Last-Sequence: 1"),
            "other namespace": entry("other", key="k"),
            "system keyspace after USE": entry(unique, op=Op.CQL, value=None, cql=CqlMutation([CqlStatement(
                "UPDATE roles SET is_superuser = true WHERE role = 'walcar_drain'", keyspace="system_auth")])),
            "its own timestamp": entry(unique, op=Op.CQL, value=None, cql=CqlMutation([CqlStatement(
                f"INSERT INTO {keyspace}.t (k, v) VALUES ('a', 'b') USING TIMESTAMP 4102444800000000")])),
            "a keyspace that is not an identifier": entry(unique, op=Op.CQL, value=None, cql=CqlMutation(
                [CqlStatement("INSERT INTO t (k, v) VALUES ('a', 'b')", keyspace="x; DROP")])),
            "a header in the content type": entry(unique, content_type="a\r\nX: y"),
            "a target it does not have": entry(unique, targets=["nonexistent"]),
        }
        for what, bad in refusals.items():
            answer = post_batch(url, unique, replicated(bad), "rgn-" + unique)
            assert answer.status_code == 200, (what, answer.text)
            result = msgspec.msgpack.decode(answer.content)["results"][0]
            assert result["refused"] is True and result["durable"] == "false", (what, result)
        # a plain insert from another region still lands
        insert = entry(unique, op=Op.CQL, value=None, key="k1", cql=CqlMutation(
            [CqlStatement(f"INSERT INTO {keyspace}.t (k, v) VALUES ('k1', 'v1')")]))
        answer = post_batch(url, unique, replicated(insert), "rgn-" + unique)
        assert msgspec.msgpack.decode(answer.content)["results"][0]["durable"] == "true"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(cassandra_session.execute(f"SELECT * FROM {keyspace}.t")):
            time.sleep(0.2)
        assert [tuple(r) for r in cassandra_session.execute(f"SELECT k, v FROM {keyspace}.t")] == [("k1", "v1")]
        tables = cassandra_session.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", [keyspace])
        assert "t" in [r.table_name for r in tables]  # not dropped

        state = trio.run(stream_state, services.nats_url, stream_name(unique))
        assert state["messages"] == 1  # only the insert was journaled
    finally:
        process.stop()


@pytest.mark.parametrize("token", ["abc\r\nNats-Expected-Last-Sequence: 1", "x" * 5000, "has space", ""])
def test_an_idempotency_token_can_never_become_a_nats_header(services: Services, tmp_path: Path, unique: str,
                                                            token: str) -> None:
    namespaces = {unique: {"partitions": 1}}
    listener = kv_listener()
    process = SidecarProcess(sidecar_document(services.nats_url, namespaces, [listener]), tmp_path / "w").start()
    try:
        url = f"http://{listener['bind']}"
        for path, body in ((f"/v1/log/{unique}", {"key": "k", "text": "v", "idempotency_token": token}),
                           (f"/v1/kv/{unique}/r", {"items": [{"key": "a", "text": "v"}], "idempotency_token": token})):
            answer = httpx.request("POST" if "log" in path else "PUT", f"{url}{path}", json=body)
            assert answer.status_code == 400 and answer.json()["field"] == "idempotency_token", answer.text
        bad_type = httpx.post(f"{url}/v1/log/{unique}", json={"key": "k", "text": "v", "content_type": "a\r\nb: c"})
        assert bad_type.status_code == 400 and bad_type.json()["field"] == "content_type"

        assert trio.run(stream_state, services.nats_url, stream_name(unique))["messages"] == 0
    finally:
        process.stop()


def test_passwords_in_urls_never_leave(services: Services, tmp_path: Path, unique: str) -> None:
    nats_url = services.nats_url.replace("nats://", f"nats://alice:{PASSWORD}@")
    process = sidecar_with_token(services, tmp_path, unique, nats_url=nats_url)
    try:
        shown = httpx.get(f"{process.admin}/v1/config", headers={"authorization": f"Bearer adm-{unique}"}).text
        assert PASSWORD not in shown and "nats://<redacted>@127.0.0.1" in shown
        check = subprocess.run([sys.executable, "-m", "sidecar.cli", "config", "check", str(process.config_path)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and PASSWORD not in check.stdout + check.stderr
    finally:
        process.stop()
    assert "journal_ready" in process.log() and PASSWORD not in process.log()


def test_a_kv_listener_with_a_token_wants_it_on_every_write_and_read(services: Services, tmp_path: Path,
                                                                     unique: str) -> None:
    token = secret_file(tmp_path / "kv.token", "kv-" + unique)
    listener = {**kv_listener(), "token_file": str(token)}
    admin_token = secret_file(tmp_path / "admin.token", "adm-" + unique)
    document = sidecar_document(services.nats_url, {unique: {"partitions": 1}}, [listener],
                                admin_token_file=str(admin_token))
    process = SidecarProcess(document, tmp_path / "w").start()
    url = f"http://{listener['bind']}"
    try:
        assert httpx.post(f"{url}/v1/log/{unique}", json={"key": "k", "text": "v"}).status_code == 401
        assert httpx.get(f"{url}/v1/kv/{unique}/k").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200  # a remote region's drain probes it
        written = httpx.post(f"{url}/v1/log/{unique}", json={"key": "k", "text": "v"},
                             headers={"authorization": f"Bearer kv-{unique}"})
        assert written.status_code == 200 and written.json()["durable"] == "true"
        assert trio.run(stream_state, services.nats_url, stream_name(unique))["messages"] == 1
        # the operator's CLI finds the admin token through $WALCAR_CONFIG, as in the chart's containers
        listing = subprocess.run([sys.executable, "-m", "sidecar.cli", "dlq", "ls", unique], capture_output=True,
                                 text=True, timeout=60,
                                 env={**os.environ, "WALCAR_CONFIG": str(process.config_path)})
        assert listing.returncode == 0, listing.stderr
        bare = subprocess.run([sys.executable, "-m", "sidecar.cli", "dlq", "ls", unique, "--admin",
                               document["sidecar"]["admin"]], capture_output=True, text=True, timeout=60)
        assert bare.returncode == 1 and "401" in bare.stderr
    finally:
        process.stop()


def test_the_example_drains_to_cassandra_as_a_role_that_is_not_a_superuser(services: Services, cassandra_session,
                                                                          keyspace: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    document = tomllib.loads((root / "examples" / "walcar.toml").read_text())
    target = document["namespaces"]["playback"]["targets"][0]
    assert target["username"] == "walcar_drain"
    target["password_file"] = str(root / target["password_file"])
    document["sidecar"].update(nats_url=services.nats_url, admin=f"127.0.0.1:{free_port()}", shutdown_grace="0s")
    for listener in document["listeners"]:
        listener["bind"] = f"127.0.0.1:{free_port()}"
    document["listeners"] = [item for item in document["listeners"] if item["protocol"] == "kv"]
    document["namespaces"] = {"playback": document["namespaces"]["playback"]}
    process = SidecarProcess(document, tmp_path / "example").start()
    try:
        written = httpx.post(f"http://{document['listeners'][0]['bind']}/v1/log/playback",
                             json={"key": "k", "text": "v"}, timeout=30)
        assert written.status_code == 200 and written.json()["durable"] == "true"
        rows = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rows:
            rows = list(cassandra_session.execute("SELECT id FROM walcar_example.playback WHERE id = 'k'"))
            time.sleep(0.2)
        assert rows, "the drain (as walcar_drain) never applied the write"
    finally:
        process.stop()
    from tests.support.cassandra import driver_cluster

    password = (root / "examples" / "walcar-drain.password").read_text().strip()
    cluster = driver_cluster(services.cassandra[1], username="walcar_drain", password=password)
    try:
        with pytest.raises(Exception, match=r"Unauthorized|permission"):
            cluster.connect().execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()
