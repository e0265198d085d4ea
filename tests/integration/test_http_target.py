"""The `http` target against a real application (hypercorn on trio, tests/support/httpapp.py).

Order per key, no loss across an outage, the DLQ for a refusal, dedupe by Idempotency-Key
after a forced redelivery, batching, keys that try to escape their path segment, and a
replay through the real CLI.
"""

from __future__ import annotations

import pytest
import trio

from sidecar.envelope import Op
from sidecar.log.streams import dlq_stream_name
from tests.integration.test_drain import write_load
from tests.integration.test_injector_tls import issue, make_ca
from tests.integration.test_replay import walcar, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.httpapp import RecordingApp, served
from tests.support.services import Services
from tests.support.sidecar import build_config, free_port, running_sidecar, sidecar_document
from tests.support.streams import read_stream
from tests.support.waiting import converge, until

FAST_RETRY = {"initial_delay": "20ms", "max_delay": "500ms", "multiplier": 2.0, "max_attempts": 50}
DRAIN = {"lease_ttl": "2s", "ack_wait": "10s"}


def http_target(url: str, **settings: object) -> dict:
    return {"name": "app", "type": "http", "url": f"{url}/apply/{{namespace}}/{{key}}", **settings}


def document(services: Services, unique: str, target: dict, partitions: int = 4) -> dict:
    return sidecar_document(services.nats_url, {unique: {"partitions": partitions, "retry": FAST_RETRY,
                                                         "targets": [target]}}, drain=DRAIN)


def in_order(app: RecordingApp, last: dict[str, str]) -> dict[str, object]:
    """Keys whose applied values are not increasing or do not end at the last acked value."""
    wrong: dict[str, object] = {}
    for key, expected in last.items():
        values = [int(v.decode().split("=")[1]) for v in app.applied.get(key, [])]
        if values != sorted(values) or not values or f"{key}={values[-1]}" != expected:
            wrong[key] = values[-5:]
    return wrong


async def test_every_entry_arrives_once_in_order_per_key_with_its_headers(services: Services, unique: str) -> None:
    app = RecordingApp()
    keys = [f"k{i}" for i in range(50)]
    async with served(app) as server:
        config = build_config(document(services, unique, http_target(server.url, headers={"X-Tenant": "t1"})))
        async with running_sidecar(config) as sidecar:
            last = await write_load(sidecar.ingress, unique, keys, 3000)
            await converge(lambda: in_order(app, last), 60, "every key's last value, in order")
            assert sum(len(v) for v in app.applied.values()) == 3000
            assert sidecar.drain.drainer(unique, "app").stats.dead_lettered == 0
    first = app.received[0]
    assert first.path == f"/apply/{unique}/{first.key}"
    assert first.headers["x-tenant"] == "t1" and first.headers["walcar-namespace"] == unique
    assert first.op == "put" and first.origin == "local" and first.seq > 0 and first.write_time > 0
    assert len({r.seq for r in app.received}) == len(app.received)  # each entry's own journal sequence


async def test_no_loss_across_an_outage_and_a_503_with_retry_after(services: Services, unique: str) -> None:
    app = RecordingApp()
    keys = [f"k{i}" for i in range(100)]
    async with served(app) as server:
        config = build_config(document(services, unique, http_target(server.url)))
        async with running_sidecar(config) as sidecar:
            drainer = sidecar.drain.drainer(unique, "app")
            await server.stop()  # connection refused
            last = await write_load(sidecar.ingress, unique, keys, 2000)
            await until(lambda: drainer.state == "breaker-open", 20, "the breaker to open")
            app.outage, app.retry_after = 503, "1"  # back, behind a gateway that says "not yet"
            await server.start()
            await until(lambda: app.requests > 0, 30, "a request during the 503s")
            assert not app.applied
            app.outage = None
            last = {**last, **await write_load(sidecar.ingress, unique, keys, 1000, first=2000)}
            await converge(lambda: in_order(app, last), 90, "the backlog after the outage")
            assert drainer.stats.dead_lettered == 0
            assert sum(len(v) for v in app.applied.values()) == 3000


@pytest.mark.parametrize("reconnected", [0.0, 0.05, 0.3])
async def test_a_delivery_lost_with_the_connection_still_comes_before_newer_entries_of_its_key(
        services: Services, unique: str, reconnected: float) -> None:
    """The connection to NATS goes while the server is sending the drain an entry. JetStream would send it
    again only after AckWait, after a newer entry of its key, and the drain (which skips what is not newer
    than its key's last apply) would never send it on: an event missing from the application's log. The
    partition starts again from its ack floor instead: every entry arrives, in order, well before AckWait,
    also when the newer entry is written after the drain has connected again."""
    app = RecordingApp()
    host, port = services.nats_url.removeprefix("nats://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port))).start()
    async with served(app) as server:
        direct = sidecar_document(services.nats_url, {unique: {"partitions": 1, "retry": FAST_RETRY,
                                                               "targets": [http_target(server.url)]}},
                                  drain={"lease_ttl": "2s", "ack_wait": "60s"})
        through_proxy = {**direct, "sidecar": {**direct["sidecar"], "nats_url": f"nats://127.0.0.1:{proxy.port}",
                                               "admin": f"127.0.0.1:{free_port()}"}}
        async with running_sidecar(build_config(direct), role="ingress") as writer, \
                running_sidecar(build_config(through_proxy), role="drain"):
            async def put(value: bytes) -> None:
                assert (await writer.ingress.write(writer.ingress.entry(unique, Op.PUT, "k", value=value))).ok

            await put(b"1")
            await until(lambda: app.applied.get("k") == [b"1"], 30, "the first entry")
            proxy.stall_replies.set()  # the server's sending to the drain is held in the proxy ...
            await put(b"2")  # ... so this reaches the drain's waiting pull, and stops there
            await trio.sleep(0.5)
            proxy.sever()  # and is lost with the connection
            proxy.stall_replies.clear()
            await trio.sleep(reconnected)  # the link is back within milliseconds: a newer entry may reach it first
            await put(b"3")
            await until(lambda: len(app.applied.get("k", [])) >= 3, 30, "all three, long before the 60 s AckWait")
            assert app.applied["k"] == [b"1", b"2", b"3"]
    proxy.close()


async def test_a_4xx_is_dead_lettered_with_status_and_body_and_others_flow(services: Services, unique: str) -> None:
    app = RecordingApp(refuse={"poison": 422})
    async with served(app) as server:
        config = build_config(document(services, unique, http_target(server.url)))
        async with running_sidecar(config) as sidecar:
            ingress = sidecar.ingress
            for key, value in (("good", "1"), ("poison", "p"), ("good", "2")):
                assert (await ingress.write(ingress.entry(unique, Op.PUT, key, value=value.encode()))).ok
            drainer = sidecar.drain.drainer(unique, "app")
            await until(lambda: drainer.stats.dead_lettered == 1 and app.applied.get("good") == [b"1", b"2"], 30)
    letters = await read_stream(services.nats_url, dlq_stream_name(unique))
    assert len(letters) == 1
    headers = letters[0].headers
    assert headers["Walcar-Target"] == "app" and headers["Walcar-Error-Class"] == "permanent"
    assert "422" in headers["Walcar-Error"] and "refused key poison: invalid value" in headers["Walcar-Error"]
    assert letters[0].entry().key == "poison"


async def test_a_lost_answer_is_redelivered_and_deduped_by_idempotency_key_then_replay(
        services: Services, unique: str, tmp_path) -> None:
    keys = [f"k{i}" for i in range(20)]
    app = RecordingApp(lose_answer=set(keys[:10]))
    async with served(app) as server:
        doc = document(services, unique, http_target(server.url))
        config = build_config(doc)
        async with running_sidecar(config) as sidecar:
            last = await write_load(sidecar.ingress, unique, keys, 400)
            await converge(lambda: in_order(app, last), 60, "every key")
            await until(lambda: app.duplicates >= 10, 30, "the redeliveries")
        applied = {k: list(v) for k, v in app.applied.items()}
        assert sum(len(v) for v in applied.values()) == 400  # each entry applied once, however often it came
        redelivered = {r.key for r in app.received if r.id in app._lost}
        assert redelivered == set(keys[:10])

        # Replay the whole journal into the same application: every entry again, every one a duplicate.
        before = len(app.received)
        result = await walcar("replay", "--config", str(write_config(tmp_path, doc)), "--namespace", unique,
                              "--target", "app")
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(app.received) - before == 400
        assert app.applied == applied
        verify = await walcar("verify", "--config", str(write_config(tmp_path, doc)), "--namespace", unique,
                              "--target", "app")
        assert verify.returncode != 0 and "verify does not apply" in verify.stdout + verify.stderr


async def test_batches_keep_order_and_keys_cannot_escape_their_segment(services: Services, unique: str) -> None:
    app = RecordingApp()
    keys = [f"k{i}" for i in range(30)]
    async with served(app) as server:
        batched = build_config(document(services, unique, http_target(server.url, batch="ndjson", max_batch=16)))
        async with running_sidecar(batched) as sidecar:
            last = await write_load(sidecar.ingress, unique, keys, 2000)
            await converge(lambda: in_order(app, last), 60, "every key, batched")
        assert sum(len(v) for v in app.applied.values()) == 2000
        assert max(int(r.headers["walcar-batch-size"]) for r in app.received) > 1

    app = RecordingApp()
    async with served(app) as server:
        config = build_config(document(services, f"{unique}x", http_target(server.url)))
        hostile = ["../../admin?drop=1#x", "..", "a/b", "sp ace", "ünï", "%2e%2e"]
        async with running_sidecar(config) as sidecar:
            for key in hostile:
                ack = await sidecar.ingress.write(sidecar.ingress.entry(f"{unique}x", Op.PUT, key, value=b"v"))
                assert ack.ok
            await until(lambda: len(app.applied) == len(hostile), 30)
    assert set(app.applied) == set(hostile)
    for received in app.received:
        prefix = f"/apply/{unique}x/"
        assert received.path.startswith(prefix) and "/" not in received.path[len(prefix):]
        assert "?" not in received.path


async def test_https_with_a_private_ca_and_a_bearer_token_from_a_file(services: Services, unique: str,
                                                                     tmp_path) -> None:
    ca = make_ca()
    certfile, keyfile = tmp_path / "tls.crt", tmp_path / "tls.key"
    issue(ca, certfile, keyfile)
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    (tmp_path / "token").write_text("s3cret-token\n")
    app = RecordingApp()
    async with served(app, tls=(str(certfile), str(keyfile))) as server:
        target = http_target(server.url, ca_file=str(tmp_path / "ca.pem"), token_file=str(tmp_path / "token"))
        async with running_sidecar(build_config(document(services, unique, target))) as sidecar:
            ack = await sidecar.ingress.write(sidecar.ingress.entry(unique, Op.PUT, "k", value=b"v"))
            assert ack.ok
            await until(lambda: app.applied.get("k") == [b"v"], 30)
    assert app.received[0].headers["authorization"] == "Bearer s3cret-token"
