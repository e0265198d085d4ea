"""The KV API against a real nats-server: durable only with a PubAck, and the journal holds what was acked."""

from __future__ import annotations

import base64
import time

import httpx
import msgspec
import pytest
import trio

from sidecar.config import stream_name
from sidecar.envelope import Op, partition_of, subject_for
from tests.support.services import Services
from tests.support.sidecar import base_url, build_config, kv_listener, running_sidecar, sidecar_document
from tests.support.streams import read_stream, stream_state


def namespace_config(**overrides: object) -> dict:
    return {"partitions": 8, **overrides}


@pytest.fixture
def config(services: Services, unique: str):
    return build_config(sidecar_document(services.nats_url, {unique: namespace_config()}, [kv_listener()],
                                         region="us-east-1"))


async def test_acked_writes_are_in_the_stream_with_their_envelope(config, services: Services, unique: str) -> None:
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        before = time.time_ns() // 1000
        sent = {}
        for i in range(20):
            response = await client.post(
                f"/v1/log/{unique}",
                json={"key": f"user-{i % 5}", "text": f"payload {i}", "idempotency_token": f"tok-{i}",
                      "content_type": "text/plain"},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["durable"] == "true" and body["visible"] is False and body["sequence"] > 0
            sent[body["sequence"]] = i
        put = await client.put(
            f"/v1/kv/{unique}/user-9",
            json={"items": [
                {"key": "name", "text": "ada"},
                {"key": "photo", "value": base64.b64encode(b"\x00\xff").decode(), "ttl_s": 60},
            ]},
        )
        assert put.status_code == 200 and put.json()["durable"] == "true"
        after = time.time_ns() // 1000

    messages = await read_stream(services.nats_url, stream_name(unique))
    by_seq = {m.seq: m for m in messages}
    for seq, i in sent.items():
        message = by_seq[seq]
        entry = message.entry()
        key = f"user-{i % 5}"
        assert message.subject == subject_for(unique, partition_of(key, 8))
        assert message.headers["Nats-Msg-Id"] == f"tok-{i}"
        assert (entry.id, entry.ns, entry.op, entry.key, entry.value) == (f"tok-{i}", unique, Op.PUT, key,
                                                                          f"payload {i}".encode())
        assert entry.partition == partition_of(key, 8)
        assert entry.origin == "us-east-1" and entry.content_type == "text/plain"
        assert before <= entry.write_time <= after
    items = {m.entry().item: m.entry() for m in messages if m.entry().key == "user-9"}
    assert items["name"].value == b"ada" and items["name"].expires_at == 0
    assert items["photo"].value == b"\x00\xff"
    assert items["photo"].expires_at == items["photo"].write_time // 1_000_000 + 60
    assert len(messages) == 22


async def test_same_idempotency_token_is_stored_once(config, services: Services, unique: str) -> None:
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        request = {"key": "k", "text": "once", "idempotency_token": "retry-me"}
        first = (await client.post(f"/v1/log/{unique}", json=request)).json()
        second = (await client.post(f"/v1/log/{unique}", json=request)).json()
        mutation = {"mutations": [{"op": "put", "id": f"r{i}", "items": [{"key": "a", "text": "x"}]} for i in range(3)],
                    "idempotency_token": "mutation-1"}
        third = (await client.post(f"/v1/kv/{unique}/mutate", json=mutation)).json()
        fourth = (await client.post(f"/v1/kv/{unique}/mutate", json=mutation)).json()
    assert first["duplicate"] is False and second["duplicate"] is True
    assert second["sequence"] == first["sequence"] and second["durable"] == "true"
    assert third["duplicate"] is False and fourth["duplicate"] is True and fourth["durable"] == "true"
    assert (await stream_state(services.nats_url, stream_name(unique)))["messages"] == 4


async def test_atomic_mutate_of_500_entries_over_50_ids(config, services: Services, unique: str) -> None:
    mutations = [
        {"op": "put", "id": f"rec-{r}", "items": [{"key": f"item-{i}", "text": f"{r}/{i}"} for i in range(10)]}
        for r in range(50)
    ]
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        response = await client.post(f"/v1/kv/{unique}/mutate", json={"mutations": mutations})
    body = response.json()
    assert response.status_code == 200 and body["durable"] == "true", body
    messages = await read_stream(services.nats_url, stream_name(unique))
    assert len(messages) == 500
    assert body["sequence"] == max(m.seq for m in messages)
    seen = {(m.entry().key, m.entry().item): m.entry().value for m in messages}
    assert seen == {(f"rec-{r}", f"item-{i}"): f"{r}/{i}".encode() for r in range(50) for i in range(10)}
    # Every entry sits on its key's partition, and the whole batch shares one atomic batch id.
    assert all(m.subject == subject_for(unique, partition_of(m.entry().key, 8)) for m in messages)
    assert len({m.headers.get("Nats-Batch-Id") for m in messages}) == 1


async def test_oversized_mutation_goes_to_the_chunk_store_as_one_marker(config, services: Services,
                                                                        unique: str) -> None:
    mutations = [{"op": "put", "id": f"rec-{r}", "items": [{"key": "v", "text": "x" * 10}]} for r in range(1500)]
    async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
        response = await client.post(f"/v1/kv/{unique}/mutate", json={"mutations": mutations})
        assert response.status_code == 200 and response.json()["durable"] == "true"
        messages = await read_stream(services.nats_url, stream_name(unique))
        assert len(messages) == 1
        marker = messages[0].entry()
        assert marker.op == Op.MULTI and marker.chunk is not None
        from sidecar.envelope import decode_many

        stored = decode_many(await sidecar.ingress.journal.chunks.get(unique, marker.chunk))
    assert [(e.key, e.value) for e in stored] == [(f"rec-{r}", b"x" * 10) for r in range(1500)]


@pytest.mark.parametrize("size_mib", [5, 16])
async def test_large_payload_goes_to_chunk_store_before_its_marker(services: Services, unique: str,
                                                                   size_mib: int) -> None:
    listener = {**kv_listener(), "max_body": "17MiB", "partial_budget": "34MiB"}  # a 16 MiB value in one body
    document = sidecar_document(services.nats_url, {unique: namespace_config(max_item_size="17MiB")}, [listener])
    config = build_config(document)
    payload = bytes(range(256)) * (size_mib * 4096)
    async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config), timeout=60) as client:
        response = await client.post(
            f"/v1/log/{unique}", content=msgspec.msgpack.encode({"key": "big", "payload": payload}),
            headers={"content-type": "application/msgpack"},
        )
        assert response.status_code == 200, response.content
        assert msgspec.msgpack.decode(response.content)["durable"] == "true"
        messages = await read_stream(services.nats_url, stream_name(unique))
        assert len(messages) == 1
        entry = messages[0].entry()
        assert entry.value is None and entry.chunk is not None
        assert entry.chunk.size == len(payload) and entry.chunk.chunks == -(-len(payload) // (128 * 1024))
        assert await sidecar.ingress.journal.chunks.get(unique, entry.chunk) == payload  # digest checked
        # The marker was stored after every chunk of its object.
        chunk_messages = await read_stream(services.nats_url, f"OBJ_walchunks_{unique}")
        assert max(m.time_ns for m in chunk_messages) <= messages[0].time_ns


async def test_bad_requests_name_the_field(config, unique: str) -> None:
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        wrong_type = await client.put(f"/v1/kv/{unique}/r", json={"items": [{"key": 7, "text": "x"}]})
        assert wrong_type.status_code == 400
        assert wrong_type.json() == {"error": "Expected `str`, got `int`", "field": "items[0].key"}
        both = await client.put(f"/v1/kv/{unique}/r", json={"items": [{"key": "a"}]})
        assert both.status_code == 400 and both.json()["field"] == "items[0]"
        unknown_field = await client.post(f"/v1/log/{unique}", json={"key": "a", "text": "x", "colour": "red"})
        assert unknown_field.status_code == 400 and unknown_field.json()["field"] == "colour"
        malformed = await client.post(f"/v1/log/{unique}", content=b"{not json",
                                      headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
        missing_ns = await client.post("/v1/log/nosuchns", json={"key": "a", "text": "x"})
        assert missing_ns.status_code == 404
        too_far = await client.post(f"/v1/log/{unique}", json={"key": "a", "text": "x",
                                                               "lifecycle": {"write_time": 1_000_000}})
        assert too_far.status_code == 400 and too_far.json()["field"] == "lifecycle.write_time"
        assert "in the past" in too_far.json()["error"]
        wrong_method = await client.get(f"/v1/log/{unique}")
        assert wrong_method.status_code == 405


async def test_value_over_max_item_size_is_413(services: Services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: namespace_config(max_item_size="1KiB")},
                                           [kv_listener()]))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        response = await client.post(f"/v1/log/{unique}", json={"key": "a", "text": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["field"] == "payload"


async def test_openapi_document_describes_every_route(config) -> None:
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        document = (await client.get("/openapi.json")).json()
    assert set(document["paths"]) == {"/v1/log/{namespace}", "/v1/kv/{namespace}/{id}", "/v1/kv/{namespace}/mutate"}
    assert {"WriteToLog", "PutItems", "MutateItems", "WriteResponse"} <= set(document["components"]["schemas"])


async def test_delayed_entry_appears_on_its_partition_no_earlier_than_asked(config, services: Services,
                                                                           unique: str) -> None:
    key = "later"
    subject = subject_for(unique, partition_of(key, 8))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        asked = time.monotonic()
        response = await client.post(f"/v1/log/{unique}",
                                     json={"key": key, "text": "x", "lifecycle": {"delay_ms": 2000}})
        assert response.json()["durable"] == "true"
        await trio.sleep(1.0)
        early = await read_stream(services.nats_url, stream_name(unique), subject)
        assert early == [], f"on the partition after {time.monotonic() - asked:.2f}s"
    # The sidecar is gone now: the schedule lives in the stream, not in the sidecar's memory.
    delivered = []
    while time.monotonic() - asked < 10 and not delivered:
        await trio.sleep(0.2)
        delivered = await read_stream(services.nats_url, stream_name(unique), subject)
    assert delivered, "the delayed entry never reached its partition"
    assert time.monotonic() - asked >= 1.9
    entry = delivered[0].entry()
    assert entry.key == key and entry.value == b"x" and entry.deliver_at > entry.write_time


async def test_an_entry_too_big_for_one_message_goes_to_the_chunk_store_whole(services: Services,
                                                                              unique: str) -> None:
    """A CQL entry's values are not chunked one by one: over a message's size, the entry goes whole."""
    from sidecar.envelope import CqlMutation, CqlStatement, decode_many
    from sidecar.ingress import Ingress
    from sidecar.log.service import open_journal

    config = build_config(sidecar_document(services.nats_url, {unique: {}}))
    statements = [CqlStatement(query="INSERT INTO ks.t (id, v) VALUES (?, ?)", values=[b"k", b"x" * 200_000])] * 6
    async with open_journal(config) as journal:
        ingress = Ingress(config, journal)
        entry = ingress.entry(unique, Op.CQL, "ks.t:6b", cql=CqlMutation(statements=statements, batch_type=1))
        ack = await ingress.write(entry)
        assert ack.ok, ack
        marker = (await read_stream(services.nats_url, stream_name(unique)))[0].entry()
        assert marker.op == Op.MULTI and marker.id == entry.id
        assert decode_many(await journal.chunks.get(unique, marker.chunk)) == [entry]
