"""Fuzz the KV API of a real sidecar: whatever arrives, the answer is a protocol answer, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document

NAMESPACE = "fuzz"
FIELDS = ["key", "text", "payload", "value", "items", "item_keys", "mutations", "op", "id", "lifecycle",
          "delay_ms", "write_time", "idempotency_token", "target", "ttl_s", "content_type"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                                                                       children, max_size=5),
    max_leaves=20,
)
items = st.lists(st.fixed_dictionaries({"key": st.text(max_size=10)},
                                       optional={"text": st.text(max_size=10), "value": st.just("eHl6"),
                                                 "ttl_s": st.integers(-5, 10**12)}), max_size=4)
near_valid = st.one_of(
    st.fixed_dictionaries({"key": st.text(max_size=30)}, optional={
        "text": st.text(max_size=50), "payload": st.text(max_size=20), "idempotency_token": st.text(max_size=20),
        "lifecycle": st.fixed_dictionaries({}, optional={"delay_ms": st.integers(-10, 10**15),
                                                          "write_time": st.integers(-2**63, 2**63 - 1)}),
        "target": st.lists(st.text(max_size=5), max_size=2)}),
    st.fixed_dictionaries({"items": items}),
    st.fixed_dictionaries({"mutations": st.lists(st.fixed_dictionaries(
        {"op": st.sampled_from(["put", "delete", "upsert"]), "id": st.text(max_size=10)},
        optional={"items": items, "item_keys": st.lists(st.text(max_size=5), max_size=3)}), max_size=5)}),
)
paths = st.one_of(
    st.sampled_from([f"/v1/log/{NAMESPACE}", f"/v1/kv/{NAMESPACE}/mutate", f"/v1/kv/{NAMESPACE}/rec", "/openapi.json",
                     "/v1/log/", "/v1/kv", "/", f"/v1/log/{NAMESPACE}/extra", "/v1/log/nope"]),
    st.text(alphabet="abcdefv1/%._-~", max_size=40).map(lambda p: "/" + p),
    st.builds(lambda rec: f"/v1/kv/{NAMESPACE}/{rec}", st.text(alphabet="abc%/20é", min_size=1, max_size=10)),
)
bodies = st.one_of(
    json_values.map(lambda v: ("application/json", json.dumps(v).encode())),
    near_valid.map(lambda v: ("application/json", json.dumps(v).encode())),
    near_valid.map(lambda v: ("application/msgpack", msgspec.msgpack.encode(v))),
    st.binary(max_size=200).map(lambda b: ("application/json", b)),
    st.binary(max_size=200).map(lambda b: ("application/msgpack", b)),
)


@pytest.fixture(scope="module")
def sidecar(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    workdir: Path = tmp_path_factory.mktemp("fuzz-sidecar")
    document = sidecar_document(services.nats_url, {NAMESPACE: {"max_item_size": "4KiB"}}, [kv_listener()])
    process = SidecarProcess(document, workdir).start()
    yield process
    assert process.stop() == 0
    assert "kv_handler_failed" not in process.log()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=paths, body=bodies)
def test_no_request_gets_a_500(sidecar: SidecarProcess, method: str, path: str, body: tuple[str, bytes]) -> None:
    url = f"http://{sidecar.document['listeners'][0]['bind']}"
    content_type, content = body
    try:
        response = httpx.request(method, url + path, content=content, headers={"content-type": content_type},
                                 timeout=10)
    except httpx.InvalidURL:
        return  # the client refused to send it; nothing reached the server
    assert response.status_code in (200, 400, 404, 405, 413, 503), (response.status_code, response.text)
    if response.status_code == 200 and path != "/openapi.json":
        reply = msgspec.msgpack.decode(response.content) if content_type == "application/msgpack" \
            else response.json()
        assert reply["durable"] == "true"
