"""The KV listener's connection bounds against a real sidecar process and nats-server (issue 18).

Like the memcached and CQL fronts: connections past `max_connections` (clamped to what
`ulimit -n` leaves) are answered 503 and closed at once, connections idle for
`idle_timeout` are closed, both counted in `walcar_front_*` metrics, and the clients
already served and the admin probes keep working throughout.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from typing import Any

import msgspec

from tests.integration import test_front_limits
from tests.integration.test_front_limits import assert_full, metrics, port_of, readyz
from tests.support.services import Services
from tests.support.sidecar import kv_listener, sidecar_document, wait_until

start = test_front_limits.start  # the fixture: sidecar processes stopped at the test's end


def write(conn: http.client.HTTPConnection, namespace: str, key: str) -> dict[str, Any]:
    conn.request("POST", f"/v1/log/{namespace}", body=json.dumps({"key": key, "text": "v"}),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200, body
    return body


def test_kv_connections_over_the_cap_are_refused_and_the_rest_keeps_working(start: Any, services: Services,
                                                                            unique: str) -> None:
    """ulimit -n 256: a cap of 256 is clamped to 256 - 128 reserved descriptors."""
    kv = {**kv_listener(), "max_connections": 256}
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]), nofile=256)
    port = port_of(kv)
    served = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert write(served, unique, "before")["durable"] == "true"
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        refused = 0
        for sock in socks[127:]:  # the served client holds one of the 128
            sock.settimeout(10)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            assert data.startswith(b"HTTP/1.1 503 ") and b"max_connections" in data, data
            refused += 1
        assert refused == 300 - 127
        text = assert_full(sidecar, port, "kv")
        assert f'walcar_front_connections_refused_total{{bind="127.0.0.1:{port}",protocol="kv"}} 173.0' in text
        assert write(served, unique, "during")["durable"] == "true"  # the served client still writes
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: f'walcar_front_connections{{bind="127.0.0.1:{port}",protocol="kv"}} 1.0'
               in metrics(sidecar), 10, "the closed connections released")
    fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert write(fresh, unique, "after")["durable"] == "true"


def test_idle_kv_connections_are_closed_after_idle_timeout(start: Any, services: Services, unique: str) -> None:
    kv = {**kv_listener(), "idle_timeout": "1s"}
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]))
    port = port_of(kv)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        silent.settimeout(10)
        assert silent.recv(4096) == b""  # never sent a request: closed well within the 10 s
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert write(conn, unique, "k")["durable"] == "true"
    assert conn.sock is not None
    conn.sock.settimeout(10)
    assert conn.sock.recv(4096) == b""  # idle after its answer: closed too
    wait_until(lambda: f'walcar_front_idle_closed_total{{bind="127.0.0.1:{port}",protocol="kv"}} 2.0'
               in metrics(sidecar), 10, "both idle closes counted")


def test_half_sent_large_kv_bodies_share_the_partial_budget(start: Any, services: Services, unique: str) -> None:
    """40 connections each inside a 14 MB PUT body: two fit the 32 MiB budget, the others are
    answered 503 (Retry-After) unread, and memory stays within the budget."""
    kv = {**kv_listener(), "partial_budget": "32MiB", "partial_wait": "1s", "max_body": "16MiB"}
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]))
    port = port_of(kv)
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert write(warm, unique, "warm")["durable"] == "true"
    baseline = sidecar.rss_mib()
    size = 14 * 1000 * 1000
    socks = []
    try:
        for n in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            socks.append(sock)
            head = (f"PUT /v1/kv/{unique}/r{n} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/msgpack\r\n"
                    f"content-length: {size}\r\n\r\n").encode()
            pending = memoryview(head + b"\x81\xa5items" + b"v" * (size // 2))  # msgpack: JSON stops at max_json_body
            deadline = time.monotonic() + 0.3
            while pending and time.monotonic() < deadline:  # as much as the sidecar takes, half at most
                try:
                    pending = pending[sock.send(pending):]
                except BlockingIOError:
                    time.sleep(0.01)
        peak, refused = baseline, 0
        deadline = time.monotonic() + 4  # past partial_wait: the starved ones are answered
        while time.monotonic() < deadline:
            peak = max(peak, sidecar.rss_mib())
            for sock in socks:
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    continue
                if answer.startswith(b"HTTP/1.1 503 "):
                    assert b"retry-after" in answer.lower() and b"partial_budget" in answer, answer
                    refused += 1
            time.sleep(0.1)
        assert refused >= 30, refused  # 32 MiB holds two 14 MB bodies; the others were turned away
        assert peak < baseline + 32 + 40, (baseline, peak)  # the budget + hypercorn's buffers per connection
        assert readyz(sidecar) == 200
        assert f'walcar_front_partial_refused_total{{bind="127.0.0.1:{port}",protocol="kv"}}' in metrics(sidecar)
    finally:
        for sock in socks:
            sock.close()
    big = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # room again once they left
    big.request("PUT", f"/v1/kv/{unique}/after", body=json.dumps({"items": [{"key": "a", "text": "w" * 2_000_000}]}),
                headers={"content-type": "application/json"})
    response = big.getresponse()
    assert response.status == 200, response.read()


def test_json_bodies_stop_at_max_json_body_and_msgpack_goes_on_to_max_body(start: Any, services: Services,
                                                                            unique: str) -> None:
    """A JSON body is parsed in one step on the event loop, so it has a smaller limit of its own;
    the same write as msgpack is taken up to max_body."""
    kv = kv_listener()
    start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]))
    value = b"v" * (3 * 1024 * 1024)  # 4 MiB once base64: over the default max_json_body of 2 MiB
    body = json.dumps({"items": [{"key": "a", "value": base64.b64encode(value).decode()}]}).encode()
    with socket.create_connection(("127.0.0.1", port_of(kv)), timeout=30) as sock:
        # Refused from its Content-Length, before it is read: send the head and a first piece only.
        sock.sendall(f"PUT /v1/kv/{unique}/r HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body[:65536])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413 ") and b"application/msgpack" in answer, answer
    conn = http.client.HTTPConnection("127.0.0.1", port_of(kv), timeout=30)
    conn.request("PUT", f"/v1/kv/{unique}/r", body=msgspec.msgpack.encode({"items": [{"key": "a", "value": value}]}),
                 headers={"content-type": "application/msgpack"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
