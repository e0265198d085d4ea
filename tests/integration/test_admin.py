"""The operator's view of a real sidecar process: metrics, pause/resume, DLQ, graceful shutdown, CLI."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import stream_name
from tests.integration.test_drain import cassandra_target, memcached_target, memcached_values, write_load
from tests.support.httpload import KvConnection
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document
from tests.support.streams import read_stream, stream_state
from tests.support.waiting import until

DRAIN = {"lease_ttl": "2s", "ack_wait": "10s"}
FAST_RETRY = {"initial_delay": "20ms", "max_delay": "500ms", "multiplier": 2.0, "max_attempts": 50}


def walcar(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def metrics(process: SidecarProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{process.admin}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_and_backlog_rises_and_falls(services: Services, private_memcached: MemcachedProcess,
                                                        tmp_path: Path, unique: str) -> None:
    address = ("127.0.0.1", private_memcached.port)
    document = sidecar_document(services.nats_url, {unique: {"partitions": 4, "retry": FAST_RETRY,
                                                             "targets": [memcached_target("cache", address)]}},
                                [kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    bind = document["listeners"][0]["bind"]
    keys = [f"{unique}-{i}" for i in range(50)]
    try:
        await write_load(bind, unique, keys, 200)
        values = metrics(process)
        assert metric(values, "walcar_writes_total", namespace=unique, protocol="kv", op="put", durable="true") == 200
        assert metric(values, "walcar_journal_ack_seconds_count", namespace=unique) == 200
        assert metric(values, "walcar_journal_connected") == 1
        await trio.to_thread.run_sync(private_memcached.stop)
        before = (await stream_state(services.nats_url, stream_name(unique)))["messages"]
        await write_load(bind, unique, keys, 300)
        # The backlog counts journal messages: an entry each, or a pack of several (operations.md).
        written = (await stream_state(services.nats_url, stream_name(unique)))["messages"] - before
        await until(lambda: process.target_status("cache")["backlog"] >= written, 20, "backlog to rise")
        await trio.sleep(2.5)
        down = metrics(process)
        assert metric(down, "walcar_drain_backlog", namespace=unique, target="cache") >= written
        assert metric(down, "walcar_drain_oldest_unapplied_seconds", namespace=unique, target="cache") >= 2
        assert metric(down, "walcar_drain_breaker_open", namespace=unique, target="cache") == 2
        assert process.target_status("cache")["state"] == "breaker-open"
        await trio.to_thread.run_sync(private_memcached.start)
        await until(lambda: process.target_status("cache")["backlog"] == 0, 30, "backlog to drain")
        await trio.sleep(2.5)
        up = metrics(process)
        assert metric(up, "walcar_drain_backlog", namespace=unique, target="cache") == 0
        assert metric(up, "walcar_drain_oldest_unapplied_seconds", namespace=unique, target="cache") == 0
        assert metric(up, "walcar_drain_applied_total", namespace=unique, target="cache") >= 500
        assert process.target_status("cache")["state"] == "idle"
    finally:
        process.stop()


async def test_pause_holds_the_backlog_and_survives_a_restart(services: Services, tmp_path: Path,
                                                              unique: str) -> None:
    namespaces = {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached)]}}
    document = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN)
    bind = document["listeners"][0]["bind"]
    keys = [f"{unique}-p{i}" for i in range(20)]
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    try:
        paused = walcar("status", "--admin", document["sidecar"]["admin"])
        assert paused.returncode == 0 and unique in paused.stdout
        response = httpx.post(f"{process.admin}/v1/drain/{unique}/cache/pause", json={})
        assert response.json() == {"namespace": unique, "target": "cache", "paused": True}
        await write_load(bind, unique, keys, 100)
        await trio.sleep(2.0)
        assert memcached_values(services.memcached, keys) == {}
        assert process.target_status("cache")["state"] == "paused"
        messages = (await stream_state(services.nats_url, stream_name(unique)))["messages"]  # entries or packs
        assert process.target_status("cache")["backlog"] == messages
        process.stop()
        process.start()  # the pause lives in NATS, not in the process
        await trio.sleep(2.0)
        assert memcached_values(services.memcached, keys) == {}
        assert process.target_status("cache")["state"] == "paused"
        table = walcar("status", "--admin", document["sidecar"]["admin"]).stdout
        assert "paused" in table and re.search(rf"\b{messages}\b", table)
        httpx.post(f"{process.admin}/v1/drain/{unique}/cache/resume", json={})
        await until(lambda: len(memcached_values(services.memcached, keys)) == 20, 20, "the drain to resume")
    finally:
        process.stop()


async def test_dlq_list_show_replay_after_fix_and_purge(services: Services, cassandra_session, tmp_path: Path,
                                                        unique: str) -> None:
    keyspace = f"ks_{unique}"
    document = sidecar_document(services.nats_url, {unique: {
        "partitions": 2, "retry": FAST_RETRY, "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}},
        [kv_listener()], drain=DRAIN)
    admin = document["sidecar"]["admin"]
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    try:
        kv_host, kv_port = document["listeners"][0]["bind"].split(":")
        connection = await KvConnection.open(kv_host, int(kv_port))
        assert (await connection.post(f"/v1/log/{unique}", {"key": "before", "text": "ok"}))[0] == 200
        await until(lambda: process.target_status("db")["backlog"] == 0, 20, "the first write to apply")
        # A bad deploy drops the table: every write now fails permanently ("unconfigured table").
        cassandra_session.execute(f"DROP TABLE {keyspace}.{unique}")
        for i in range(3):
            await connection.post(f"/v1/log/{unique}", {"key": f"lost-{i}", "text": f"v{i}"})
        await connection.aclose()
        await until(lambda: process.target_status("db")["dlq"] == 3, 20, "three dead letters")

        listing = walcar("dlq", "ls", unique, "--admin", admin)
        assert listing.returncode == 0
        assert listing.stdout.count("permanent") == 3 and "lost-0" in listing.stdout
        letters = json.loads(walcar("dlq", "ls", unique, "--admin", admin, "--json").stdout)
        # Partitions dead-letter independently: find lost-0's letter by its key, not by its place.
        first = next(letter for letter in letters if letter["key"] == "lost-0")
        shown = walcar("dlq", "show", unique, str(first["seq"]), "--admin", admin)
        assert shown.returncode == 0
        assert "Walcar-Error" in shown.stdout and "InvalidRequest" in shown.stdout
        # Cassandra words it "unconfigured table" or "table ... does not exist", depending on the path taken.
        assert "unconfigured table" in shown.stdout or "does not exist" in shown.stdout, shown.stdout[:1500]
        assert '"key": "lost-0"' in shown.stdout

        # The fix: the table is back. Replay two, purge the third.
        cassandra_session.execute(f"CREATE TABLE {keyspace}.{unique} (id text, key text, value blob, "
                                  "PRIMARY KEY (id, key))")
        replay = walcar("dlq", "replay", unique, "--admin", admin, "--key", "lost-[01]")
        assert replay.returncode == 0, replay.stderr
        assert "replayed 2" in replay.stdout
        await until(lambda: {r.id for r in cassandra_session.execute(f"SELECT id FROM {keyspace}.{unique}")}
                         == {"lost-0", "lost-1"}, 20, "the replayed letters to apply")
        purge = walcar("dlq", "purge", unique, "--admin", admin)
        assert purge.returncode == 0 and "purged 1" in purge.stdout
        assert json.loads(walcar("dlq", "ls", unique, "--admin", admin, "--json").stdout) == []
    finally:
        process.stop()
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


async def test_sigterm_under_load_answers_everything_and_loses_nothing(services: Services, tmp_path: Path,
                                                                       unique: str) -> None:
    namespaces = {unique: {"partitions": 4, "targets": [memcached_target("cache", services.memcached)]}}
    document = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN, shutdown_grace="1s",
                                shutdown_deadline="10s")
    host, port = document["listeners"][0]["bind"].split(":")
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    answers: dict[str, str] = {}  # token -> durable, for every request that got an answer
    unanswered: list[str] = []
    stop = trio.Event()

    async def client(worker: int) -> None:
        connection = await KvConnection.open(host, int(port))
        n = 0
        while not stop.is_set():
            token = f"{unique}-w{worker}-{n}"
            n += 1
            try:
                status_code, body = await connection.post(f"/v1/log/{unique}", {"key": token, "text": token,
                                                                                 "idempotency_token": token})
            except (ConnectionError, OSError, trio.BrokenResourceError):
                return  # the listener closed between requests: this one was never accepted
            except Exception:
                unanswered.append(token)
                return
            answers[token] = body["durable"] if status_code in (200, 503) else f"http-{status_code}"

    began = time.monotonic()
    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(client, worker)
        await trio.sleep(1.5)
        stopped_at = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: process.proc.wait(20))
        exited_after = time.monotonic() - stopped_at
        stop.set()
    assert code == 0
    assert exited_after < 10 + 1.0, f"exited {exited_after:.1f}s after SIGTERM (deadline 10s)"
    assert not unanswered
    durable = {token for token, d in answers.items() if d == "true"}
    assert len(durable) > 100, f"only {len(durable)} writes in {time.monotonic() - began:.1f}s"
    stored = {m.entry().id for m in await read_stream(services.nats_url, stream_name(unique))}
    assert durable <= stored
    # ... and in the target: the drain finished what it held, the rest waits in the journal for the next drainer.
    restarted = SidecarProcess(document, tmp_path / "again").start()
    try:
        keys = sorted(durable)
        await until(lambda: set(memcached_values(services.memcached, keys)) == set(keys), 30,
                         "every durable write in memcached")
    finally:
        restarted.stop()


def jetstream_api_calls(server: NatsProcess) -> int:
    return int(httpx.get(f"http://127.0.0.1:{server.monitor_port}/jsz").json()["api"]["total"])


async def test_an_idle_sidecar_leaves_jetstream_alone_until_its_status_is_read(
        private_nats: NatsProcess, services: Services, tmp_path: Path) -> None:
    """Every app pod runs a sidecar: one nobody asks about must not poll JetStream's API for drain
    status (it used to: a few calls per partition every two seconds). Asked, it answers fresh numbers."""
    document = sidecar_document(private_nats.url, {"idle": {"partitions": 8, "targets": [
        memcached_target("cache", services.memcached)]}}, listeners=[kv_listener()])
    process = SidecarProcess(document, tmp_path / "walcar", role="ingress").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{document['listeners'][0]['bind']}") as client:
            for i in range(40):
                answer = await client.put(f"/v1/kv/idle/k{i}", json={"items": [{"key": "a", "text": "v"}]})
                assert answer.status_code == 200 and answer.json()["durable"] == "true"
        quiet_from = jetstream_api_calls(private_nats)
        await trio.sleep(6)
        assert jetstream_api_calls(private_nats) - quiet_from <= 2  # polling, it made ~50 in this time
        row = process.target_status("cache")  # the first read waits for a poll: no stale zero
        assert row["backlog"] == 40 and row["partitions"] == 8 and row["updated_at"]
        assert jetstream_api_calls(private_nats) - quiet_from >= 8
    finally:
        process.stop()


async def test_status_lists_every_target_even_before_jetstream_answers(
        private_nats: NatsProcess, services: Services, tmp_path: Path) -> None:
    """A status read must show the whole table: with NATS gone before the first poll, every
    configured target is listed as "unknown", and metrics export no made-up zero backlog."""
    document = sidecar_document(private_nats.url, {"ns": {"partitions": 4, "targets": [
        memcached_target("cache", services.memcached), memcached_target("copy", services.memcached)]}},
        listeners=[kv_listener()])
    process = SidecarProcess(document, tmp_path / "walcar", role="ingress").start()
    try:
        await trio.to_thread.run_sync(private_nats.stop)
        rows = httpx.get(f"{process.admin}/v1/drain", timeout=20).json()["targets"]
        assert [(r["target"], r["state"], r["partitions"]) for r in rows] == [("cache", "unknown", 4),
                                                                            ("copy", "unknown", 4)]
        table = walcar("status", "--admin", document["sidecar"]["admin"]).stdout
        assert "cache" in table and "copy" in table and "unknown" in table
        assert "walcar_drain_backlog{" not in httpx.get(f"{process.admin}/metrics").text
    finally:
        process.stop()


def test_status_against_a_dead_address_is_a_clear_error() -> None:
    result = walcar("status", "--admin", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip() == "walcar: cannot reach admin at 127.0.0.1:1: connection refused"
    assert "Traceback" not in result.stderr


async def test_replay_started_through_the_admin_endpoint(services: Services, private_memcached: MemcachedProcess,
                                                         tmp_path: Path, unique: str) -> None:
    # The admin API replays to a target the config names (a URL or a file is CLI-only): `warm` is
    # paused from the start, so only the replay can fill it.
    warm = memcached_target("warm", ("127.0.0.1", private_memcached.port))
    namespaces = {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached), warm]}}
    document = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    keys = [f"{unique}-r{i}" for i in range(200)]
    try:
        assert httpx.post(f"{process.admin}/v1/drain/{unique}/warm/pause", json={}).status_code == 200
        await until(lambda: process.target_status("warm")["state"] == "paused", 10, "warm to be paused")
        last = await write_load(document["listeners"][0]["bind"], unique, keys, 400)
        assert memcached_values(("127.0.0.1", private_memcached.port), keys) == {}
        started = httpx.post(f"{process.admin}/v1/replay",
                             json={"namespace": unique, "target": "warm", "last_value_only": True})
        assert started.status_code == 202, started.text
        job = started.json()["id"]
        await until(lambda: next(j for j in httpx.get(f"{process.admin}/v1/drain").json()["replays"]
                                      if j["id"] == job)["state"] == "done", 30, "the replay to finish")
        assert memcached_values(("127.0.0.1", private_memcached.port), keys) == last
        table = walcar("status", "--admin", document["sidecar"]["admin"]).stdout
        assert job in table and "done" in table
        bad = httpx.post(f"{process.admin}/v1/replay", json={"namespace": unique, "target": "nope"})
        assert bad.status_code == 400 and "nope" in bad.json()["error"]
    finally:
        process.stop()


async def test_metrics_on_a_scrape_port_of_their_own_and_a_token_on_mutations(services: Services, tmp_path: Path,
                                                                             unique: str) -> None:
    token = tmp_path / "admin.token"
    token.write_text("t0ken\n")
    scrape = f"127.0.0.1:{free_port()}"
    namespaces = {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached)]}}
    document = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN, metrics=scrape,
                                admin_token_file=str(token))
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    try:
        assert "walcar_journal_connected 1.0" in httpx.get(f"http://{scrape}/metrics").text
        assert httpx.get(f"http://{scrape}/readyz").status_code == 200  # kubelet probes this port
        assert httpx.get(f"http://{scrape}/v1/drain").status_code == 404  # nothing but metrics and probes
        refused = httpx.post(f"{process.admin}/v1/drain/{unique}/cache/pause")
        assert refused.status_code == 401
        paused = httpx.post(f"{process.admin}/v1/drain/{unique}/cache/pause", json={},
                            headers={"authorization": "Bearer t0ken"})
        assert paused.status_code == 200 and paused.json()["paused"] is True
        assert httpx.get(f"{process.admin}/v1/drain").status_code == 200  # reads need no token
        via_config = walcar("status", "--config", str(process.config_path), "--json")
        assert via_config.returncode == 0 and json.loads(via_config.stdout)["targets"][0]["state"] == "paused"
        resumed = walcar("drain", "--wait", "--config", str(process.config_path))  # the token comes from the config
        assert resumed.returncode == 0, resumed.stderr
        assert process.proc.wait(15) == 0
    finally:
        process.stop()


async def test_an_idle_draining_sidecar_leaves_jetstream_alone(private_nats: NatsProcess, services: Services,
                                                               tmp_path: Path) -> None:
    """Every app pod's sidecar drains its share by default (role `all`): holding its leases and
    knowing who else drains must not cost JetStream API calls while nothing happens."""
    document = sidecar_document(private_nats.url, {"idle": {"partitions": 8, "targets": [
        memcached_target("cache", services.memcached)]}}, listeners=[kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "walcar").start()
    try:
        await until(lambda: process.log().count("partition_acquired") == 8, 30, "the drainer to take its partitions")
        await trio.sleep(2)
        quiet_from = jetstream_api_calls(private_nats)
        await trio.sleep(6)  # three lease TTLs: nine renewal rounds
        assert jetstream_api_calls(private_nats) - quiet_from <= 2
    finally:
        process.stop()
