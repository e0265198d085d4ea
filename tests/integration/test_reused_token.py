"""An idempotency token reused on a mutation too large for an atomic batch (one MULTI object in the
chunk store, one marker on the stream): a retry stays a duplicate, a different mutation is a 409."""

from __future__ import annotations

import httpx

from sidecar.config import stream_name
from sidecar.envelope import Op
from sidecar.reused_token import READ_BACKS_AT_ONCE
from tests.support.services import Services
from tests.support.sidecar import base_url, build_config, kv_listener, running_sidecar, sidecar_document
from tests.support.streams import read_stream

BIG = 300 * 1024  # over the default 256 KiB chunk threshold: the mutation goes to the chunk store whole


def items(*texts: str) -> list[dict[str, str]]:
    return [{"key": f"i{n}", "text": text} for n, text in enumerate(texts)]


async def test_a_reused_token_on_a_chunked_mutation_is_a_retry_or_a_conflict(services: Services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    mutation = {"items": items("a" * BIG, "b" * BIG), "idempotency_token": "T"}
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        first = await client.put(f"/v1/kv/{unique}/r1", json=mutation)
        assert first.status_code == 200, first.json()
        assert first.json()["durable"] == "true" and not first.json()["duplicate"], first.json()

        retried = await client.put(f"/v1/kv/{unique}/r1", json=mutation)  # a new write time, same mutation
        assert retried.status_code == 200, retried.json()
        assert retried.json()["durable"] == "true" and retried.json()["duplicate"], retried.json()

        for different in (items("a" * BIG, "b" * BIG, "c"),  # one entry more
                          items("a" * BIG, "B" * BIG)):  # as many entries, another value
            reused = await client.put(f"/v1/kv/{unique}/r1", json={"items": different, "idempotency_token": "T"})
            assert reused.status_code == 409, reused.json()
            assert reused.json()["durable"] == "false" and not reused.json()["duplicate"], reused.json()
            assert "new token" in reused.json()["message"], reused.json()

        other = await client.put(f"/v1/kv/{unique}/r1", json={"items": items("a" * BIG, "B" * BIG),
                                                                "idempotency_token": "U"})
        assert other.status_code == 200 and other.json()["durable"] == "true", other.json()

    markers = [m.entry() for m in await read_stream(services.nats_url, stream_name(unique))]
    assert [(m.op, m.id) for m in markers] == [(Op.MULTI, "T"), (Op.MULTI, "U")]  # nothing of the 409s


async def test_a_reused_token_on_a_single_write_is_a_retry_or_a_conflict(services: Services, unique: str) -> None:
    """One entry under a token (inline, and large enough for the chunk store): a retry of the same
    write answers duplicate; another value under the same token answers 409 and is not stored."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        for token, value in (("S", "small"), ("L", "l" * BIG)):
            first = await client.put(f"/v1/kv/{unique}/{token}",
                                     json={"items": items(value), "idempotency_token": token})
            assert first.status_code == 200 and first.json()["durable"] == "true", first.json()
            assert not first.json()["duplicate"], first.json()

            retried = await client.put(f"/v1/kv/{unique}/{token}",
                                       json={"items": items(value), "idempotency_token": token})
            assert retried.status_code == 200, retried.json()
            assert retried.json()["durable"] == "true" and retried.json()["duplicate"], retried.json()
            assert retried.json()["sequence"] == first.json()["sequence"], retried.json()

            reused = await client.put(f"/v1/kv/{unique}/{token}",
                                      json={"items": items(value + "!"), "idempotency_token": token})
            assert reused.status_code == 409, reused.json()
            assert reused.json()["durable"] == "false" and not reused.json()["duplicate"], reused.json()
            assert "new token" in reused.json()["message"], reused.json()

    stored = [m.entry() for m in await read_stream(services.nats_url, stream_name(unique))]
    assert sorted(e.key for e in stored) == ["L", "S"]  # one entry each: nothing of the 409s


async def test_a_reused_token_on_an_atomic_batch_compares_the_values(services: Services, unique: str) -> None:
    """Small items, journaled as one atomic batch under the token's ids: the same values answer
    duplicate; as many items with another value answer 409, and nothing of it is stored. Enough items
    that their stored copies are read back several at a time (READ_BACKS_AT_ONCE), compared in order."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    texts = [f"v{n}" for n in range(3 * READ_BACKS_AT_ONCE)]
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
        mutation = {"items": items(*texts), "idempotency_token": "B"}
        first = await client.put(f"/v1/kv/{unique}/r", json=mutation)
        assert first.status_code == 200 and not first.json()["duplicate"], first.json()
        retried = await client.put(f"/v1/kv/{unique}/r", json=mutation)
        assert retried.status_code == 200 and retried.json()["duplicate"], retried.json()
        swapped = [*texts[:-2], texts[-1], texts[-2]]  # the same values, two of them on each other's item
        reused = await client.put(f"/v1/kv/{unique}/r", json={"items": items(*swapped), "idempotency_token": "B"})
        assert reused.status_code == 409 and reused.json()["durable"] == "false", reused.json()
    stored = [m.entry() for m in await read_stream(services.nats_url, stream_name(unique))]
    assert [e.value for e in stored] == [t.encode() for t in texts]
