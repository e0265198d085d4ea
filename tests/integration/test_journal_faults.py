"""The journal when NATS fails: never `durable: true` without a PubAck, never a hang, and back by itself."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from sidecar.config import stream_name
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.service import open_journal
from tests.support.faultproxy import FaultProxy
from tests.support.procs import NatsProcess
from tests.support.sidecar import base_url, build_config, kv_listener, running_sidecar, sidecar_document
from tests.support.streams import read_stream, stream_state
from tests.support.waiting import until

PUBLISH_TIMEOUT = 1.0


def journal_settings() -> dict:
    return {"publish_timeout": f"{PUBLISH_TIMEOUT}s", "shed_ack_latency": "2s"}


async def test_nats_stopped_mid_load_then_restarted(private_nats: NatsProcess, unique: str) -> None:
    config = build_config(sidecar_document(private_nats.url, {unique: {"partitions": 4}}, [kv_listener()],
                                           journal=journal_settings()))
    answers: list[tuple[str, float, str]] = []  # (durable, seconds taken, token)
    stop_writing = trio.Event()

    async def writer(client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not stop_writing.is_set():
            token = f"w{worker}-{n}"
            n += 1
            began = time.monotonic()
            try:
                response = await client.post(f"/v1/log/{unique}", json={"key": f"k{n % 50}", "text": token,
                                                                         "idempotency_token": token})
                durable = response.json()["durable"]
            except httpx.HTTPError as exc:
                durable = f"error:{type(exc).__name__}"
            answers.append((durable, time.monotonic() - began, token))
            await trio.sleep(0.005)

    async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        async with trio.open_nursery() as nursery:
            for worker in range(8):
                nursery.start_soon(writer, client, worker)
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(private_nats.kill)
            stopped_at = len(answers)
            await trio.sleep(2.0)
            during = answers[stopped_at + 8:]  # skip requests that were in flight at the kill
            assert during, "no requests were answered while NATS was down"
            assert all(d in ("false", "unknown") for d, _, _ in during), {d for d, _, _ in during}
            assert sidecar.state.not_ready_reasons()
            await trio.to_thread.run_sync(private_nats.start)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (answers and answers[-1][0] == "true"):
                await trio.sleep(0.1)
            await trio.sleep(1.0)
            stop_writing.set()
        assert answers[-1][0] == "true", "the sidecar did not start acking again after NATS came back"
        assert sidecar.state.not_ready_reasons() == []

    # No request hung: each was answered within the publish timeout (plus scheduling slack).
    assert max(seconds for _, seconds, _ in answers) < PUBLISH_TIMEOUT + 1.5
    durable = {token for d, _, token in answers if d == "true"}
    stored = {m.entry().id for m in await read_stream(private_nats.url, stream_name(unique))}
    assert durable, "nothing was acked"
    assert durable <= stored, f"{len(durable - stored)} writes answered durable are missing"


async def test_atomic_batch_cut_off_before_commit_leaves_nothing(private_nats: NatsProcess, unique: str) -> None:
    proxy = FaultProxy(("127.0.0.1", private_nats.port)).start()
    try:
        config = build_config(sidecar_document(f"nats://127.0.0.1:{proxy.port}", {unique: {"partitions": 8}},
                                               [kv_listener()], journal=journal_settings()))
        mutations = [{"op": "put", "id": f"rec-{r}", "items": [{"key": f"i{i}", "text": "v" * 3000} for i in range(20)]}
                     for r in range(50)]  # 1000 entries, ~3.3 MB: one atomic batch
        async with running_sidecar(config) as sidecar, \
                httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
            await until(lambda: not sidecar.state.not_ready_reasons(), 15, "the journal's connections to be up")
            proxy.cut_after(1_000_000)  # the connection dies a third of the way into the batch
            # msgpack: a JSON body this large is over the listener's max_json_body (2 MiB)
            response = await client.post(f"/v1/kv/{unique}/mutate", content=msgspec.msgpack.encode(
                {"mutations": mutations}), headers={"content-type": "application/msgpack"})
            assert proxy.severed.is_set()
            assert response.status_code == 503
            assert msgspec.msgpack.decode(response.content)["durable"] in ("false", "unknown")
            # Reconnected (both connections: nats-py's and the publish link), the journal works again,
            # and the cut batch is nowhere.
            await until(lambda: not sidecar.state.not_ready_reasons(), 15, "the journal to reconnect")
            after = await client.post(f"/v1/log/{unique}", json={"key": "after", "text": "x"})
            assert after.json()["durable"] == "true"
        # Past the server's 10 s abandonment of idle batches: still nothing of it.
        await trio.sleep(10.5)
        messages = await read_stream(private_nats.url, stream_name(unique))
        assert [m.entry().key for m in messages] == ["after"]
    finally:
        proxy.close()


async def test_writer_matches_every_ack_to_its_entry(services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}))
    async with open_journal(config) as journal:
        results = {}

        async def write(i: int) -> None:
            key = f"k{i % 7}"
            entry = Entry(id=f"e{i}", ns=unique, op=Op.PUT, key=key, partition=partition_of(key, 4),
                          value=str(i).encode(), write_time=now_us())
            results[i] = await journal.append(entry)

        async with trio.open_nursery() as nursery:
            for i in range(2000):
                nursery.start_soon(write, i)
        atomic = await journal.append_atomic([
            Entry(id=f"a{i}", ns=unique, op=Op.PUT, key=f"a{i}", partition=partition_of(f"a{i}", 4),
                  value=b"x", write_time=now_us()) for i in range(10)
        ])
    assert all(r.ok for r in results.values())
    assert atomic.ok and atomic.count == 10
    messages = {m.seq: m.entry() for m in await read_stream(services.nats_url, stream_name(unique))}
    for i, result in results.items():
        assert messages[result.sequence].id == f"e{i}"  # the PubAck matched to its own write
    assert [messages[s].id for s in range(atomic.first_sequence, atomic.sequence + 1)] == [f"a{i}" for i in range(10)]


def entry(unique: str, key: str, value: bytes = b"v") -> Entry:
    return Entry(id=f"{unique}-{key}", ns=unique, op=Op.PUT, key=key, partition=partition_of(key, 4), value=value,
                 write_time=now_us())


async def test_pubacks_held_back_make_writes_unknown_not_false(private_nats: NatsProcess, unique: str) -> None:
    """A server that stores a write but whose PubAck never arrives: the answer is "unknown" (it may well
    be stored, and here it is), given within the publish timeout, and the journal serves again afterwards."""
    proxy = FaultProxy(("127.0.0.1", private_nats.port)).start()
    try:
        config = build_config(sidecar_document(f"nats://127.0.0.1:{proxy.port}", {unique: {"partitions": 4}},
                                               journal=journal_settings()))
        async with open_journal(config) as journal:
            proxy.stall_replies.set()
            began = time.monotonic()
            held = await journal.append(entry(unique, "held"))
            waited = time.monotonic() - began
            proxy.stall_replies.clear()
            after = await journal.append(entry(unique, "after"))
        assert held.durable == "unknown" and "no PubAck" in held.message, held
        assert PUBLISH_TIMEOUT <= waited < PUBLISH_TIMEOUT + 1.0
        assert after.ok, after
        stored = [m.entry().key for m in await read_stream(private_nats.url, stream_name(unique))]
        assert stored == ["held", "after"]  # "unknown" was honest: the held write was stored
    finally:
        proxy.close()


async def test_connection_lost_answers_inflight_writes_at_once(private_nats: NatsProcess, unique: str) -> None:
    """Severed under writes whose PubAcks are held: they are answered "unknown" when the link breaks,
    without waiting for the publish timeout, and the link reconnects by itself."""
    proxy = FaultProxy(("127.0.0.1", private_nats.port)).start()
    try:
        config = build_config(sidecar_document(f"nats://127.0.0.1:{proxy.port}", {unique: {"partitions": 4}},
                                               journal={**journal_settings(), "publish_timeout": "20s"}))
        async with open_journal(config) as journal:
            answers = []

            async def write(key: str) -> None:
                answers.append(await journal.append(entry(unique, key)))

            proxy.stall_replies.set()
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(write, f"k{i}")
                await trio.sleep(0.5)
                began = time.monotonic()
                proxy.sever()
            answered_in = time.monotonic() - began
            proxy.stall_replies.clear()
            deadline = time.monotonic() + 10
            while not journal.writer.connected and time.monotonic() < deadline:
                await trio.sleep(0.05)
            after = await journal.append(entry(unique, "after"))
        assert [a.durable for a in answers] == ["unknown"] * 20
        assert all("connection to NATS lost" in a.message for a in answers)
        assert answered_in < 2.0
        assert after.ok, after
    finally:
        proxy.close()


async def test_stream_missing_answers_false_at_once(services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {}}, journal=journal_settings()))
    async with open_journal(config) as journal:
        from tests.support.streams import js_api

        await js_api(services.nats_url, f"STREAM.DELETE.{stream_name(unique)}")
        began = time.monotonic()
        result = await journal.append(Entry(id="x", ns=unique, op=Op.PUT, key="k", partition=0, value=b"v",
                                            write_time=now_us()))
    assert result.durable == "false" and "no responders" in result.message
    assert time.monotonic() - began < PUBLISH_TIMEOUT


async def test_start_refuses_conflicting_stream(services, unique: str, tmp_path: Path) -> None:
    from sidecar.log.streams import StreamConflict

    first = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 8}}))
    async with open_journal(first):
        pass
    second = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 16}}))
    with pytest.raises(StreamConflict) as info:
        async with open_journal(second):
            pass
    message = str(info.value)
    assert f"namespaces.{unique}.partitions = 16" in message and "created with 8" in message
    assert (await stream_state(services.nats_url, stream_name(unique)))["messages"] == 0


async def test_start_refuses_nats_server_older_than_2_12(tmp_path: Path, unique: str) -> None:
    """Debian's nats-server 2.9 has no atomic batches or schedules: walcar must refuse it by name."""
    from sidecar.log.connection import ServerTooOld
    from tests.support.procs import DebianNatsProcess

    old = DebianNatsProcess(tmp_path / "old-nats")
    old.start()
    try:
        config = build_config(sidecar_document(old.url, {unique: {}}))
        with pytest.raises(ServerTooOld) as info:
            async with open_journal(config):
                pass
    finally:
        old.stop()
    assert "nats-server 2.9.10" in str(info.value) and "walcar needs >= 2.12" in str(info.value)
