"""WriteToLog's batch form against a real nats-server: `POST /v1/log/{ns}` with a list of entries.

Each entry is checked as a single write is and answered on its own; the journal holds exactly
the entries answered durable, in the order sent; a refused entry is not journaled and does not
stop the others; retries are deduplicated entry by entry.
"""

from __future__ import annotations

import httpx
import msgspec
import trio

from sidecar.config import stream_name
from sidecar.reused_token import READ_BACKS_AT_ONCE
from tests.support.procs import NatsProcess
from tests.support.services import Services
from tests.support.sidecar import base_url, build_config, kv_listener, running_sidecar, sidecar_document
from tests.support.streams import read_stream


def memcached_namespace(services: Services) -> dict:
    host, port = services.memcached
    return {"partitions": 4, "max_item_size": "1KiB",
            "targets": [{"name": "cache", "type": "memcached", "servers": [f"{host}:{port}"]}]}


async def test_a_batch_is_journaled_in_order_one_answer_per_entry(services: Services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    batch = [{"key": f"k{n % 7}", "text": f"v{n}", "idempotency_token": f"tok-{n}"} for n in range(100)]
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        response = await client.post(f"/v1/log/{unique}", json=batch)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["durable"] for r in results] == ["true"] * 100
        sequences = [r["sequence"] for r in results]
        assert sequences == sorted(sequences) and len(set(sequences)) == 100

        again = await client.post(f"/v1/log/{unique}", json=batch)  # a retry: stored once
        assert again.status_code == 200
        assert [(r["duplicate"], r["sequence"]) for r in again.json()["results"]] == [(True, s) for s in sequences]

        packed = msgspec.msgpack.encode([{"key": "m", "payload": b"\x00\xff"}, {"key": "m", "text": "2"}])
        answer = await client.post(f"/v1/log/{unique}", content=packed,
                                   headers={"content-type": "application/msgpack"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/msgpack"
        assert [r["durable"] for r in msgspec.msgpack.decode(answer.content)["results"]] == ["true", "true"]

    messages = sorted(await read_stream(services.nats_url, stream_name(unique)), key=lambda m: m.seq)
    assert [m.seq for m in messages[:100]] == sequences
    assert [m.entry().value for m in messages[:100]] == [f"v{n}".encode() for n in range(100)]
    assert [m.entry().value for m in messages[100:]] == [b"\x00\xff", b"2"]


async def test_a_token_reused_for_another_value_in_a_batch_is_a_conflict_not_a_duplicate(
        services: Services, unique: str) -> None:
    """As for a single write: a stored id answers `duplicate` only when the stored entry is the same
    write; the same token with a different value is 409, and the new value is not stored."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv_listener()]))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        first = await client.post(f"/v1/log/{unique}", json=[{"key": "k", "text": "first", "idempotency_token": "t1"}])
        assert first.status_code == 200, first.text
        stored = first.json()["results"][0]["sequence"]
        second = await client.post(f"/v1/log/{unique}", json=[
            {"key": "k", "text": "SECOND", "idempotency_token": "t1"},  # reused for another value
            {"key": "k", "text": "first", "idempotency_token": "t1"},  # the same write again: a retry
            {"key": "other", "text": "fine"}])
        assert second.status_code == 409, second.text
        conflict, retry, fine = second.json()["results"]
        assert (conflict["status"], conflict["durable"]) == (409, "false"), conflict
        assert (retry["status"], retry["duplicate"], retry["sequence"]) == (200, True, stored), retry
        assert (fine["status"], fine["durable"]) == (200, "true"), fine
    values = [m.entry().value for m in await read_stream(services.nats_url, stream_name(unique))]
    assert sorted(values) == [b"fine", b"first"]


async def test_a_retried_batch_reads_back_its_duplicates_several_at_a_time_each_answered_in_its_place(
        services: Services, unique: str) -> None:
    """A whole batch of tokened entries retried, some under a reused token with another value: every
    duplicate is read back (READ_BACKS_AT_ONCE at a time), and each answer lands on its own entry."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    count = 5 * READ_BACKS_AT_ONCE
    batch = [{"key": f"k{n % 7}", "text": f"v{n}", "idempotency_token": f"tok-{n}"} for n in range(count)]
    changed = {3, 17, count - 1}
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        first = await client.post(f"/v1/log/{unique}", json=batch)
        assert first.status_code == 200, first.text
        sequences = [r["sequence"] for r in first.json()["results"]]
        retried = [{**e, "text": "other"} if n in changed else e for n, e in enumerate(batch)]
        again = await client.post(f"/v1/log/{unique}", json=retried)
        assert again.status_code == 409, again.text
        answers = [(r["status"], r["duplicate"], r["sequence"]) for r in again.json()["results"]]
        assert answers == [(409, False, 0) if n in changed else (200, True, sequences[n]) for n in range(count)]
    values = [m.entry().value for m in await read_stream(services.nats_url, stream_name(unique))]
    assert values == [f"v{n}".encode() for n in range(count)]


async def test_refused_entries_are_answered_on_their_own_and_not_journaled(services: Services,
                                                                           unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: memcached_namespace(services)},
                                           [{**kv_listener(), "max_items": 10}]))
    batch = [
        {"key": "good-0", "text": "a"},
        {"key": "bad key", "text": "b"},  # memcached cannot store a key with a space
        {"key": "good-1", "text": "c"},
        {"key": "big", "text": "x" * 2000},  # over the namespace's max_item_size
        {"key": "ct", "text": "d", "content_type": "a\r\nb"},
        {"key": "late", "text": "e", "lifecycle": {"delay_ms": 10**12}},
        {"key": "good-2", "text": "f"},
    ]
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        response = await client.post(f"/v1/log/{unique}", json=batch)
        assert response.status_code == 400, response.text
        results = response.json()["results"]
        assert [(r["status"], r["durable"], r.get("field", "")) for r in results] == [
            (200, "true", ""), (400, "false", "[1].key"), (200, "true", ""), (413, "false", "[3].payload"),
            (400, "false", "[4].content_type"), (400, "false", "[5].lifecycle.delay_ms"), (200, "true", ""),
        ]
        too_many = await client.post(f"/v1/log/{unique}", json=[{"key": "k", "text": "v"}] * 11)
        assert too_many.status_code == 413 and "max_items" in too_many.json()["error"]
        assert (await client.post(f"/v1/log/{unique}", json=[])).status_code == 400
        malformed = await client.post(f"/v1/log/{unique}", json=[{"key": "k", "text": "v"}, {"key": 5}])
        assert malformed.status_code == 400 and malformed.json()["field"] == "[1].key"

    messages = sorted(await read_stream(services.nats_url, stream_name(unique)), key=lambda m: m.seq)
    assert sorted(m.entry().key for m in messages) == ["good-0", "good-1", "good-2"]


async def test_a_batch_without_its_journal_is_503_and_no_entry_durable(private_nats: NatsProcess,
                                                                       unique: str) -> None:
    config = build_config(sidecar_document(private_nats.url, {unique: {"partitions": 2}}, [kv_listener()],
                                           journal={"publish_timeout": "2s"}))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        assert (await client.post(f"/v1/log/{unique}", json=[{"key": "k", "text": "v"}])).status_code == 200
        await trio.to_thread.run_sync(private_nats.kill)
        response = await client.post(f"/v1/log/{unique}", json=[{"key": f"k{n}", "text": "v"} for n in range(20)])
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert {r["durable"] for r in response.json()["results"]} <= {"false", "unknown"}
        assert {r["status"] for r in response.json()["results"]} == {503}
