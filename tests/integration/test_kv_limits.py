"""The KV listener's connection bounds against a real sidecar process and nats-server (issue 18).

Like the memcached and CQL fronts: connections past `max_connections` (clamped to what
`ulimit -n` leaves) are answered 503 and closed at once, connections idle for
`idle_timeout` are closed, both counted in `walcar_front_*` metrics, and the clients
already served and the admin probes keep working throughout.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from tests.integration import test_front_limits
from tests.integration.test_front_limits import assert_full, metrics, port_of
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
    """ulimit -n 256: the cap is clamped to 256 - 128 reserved descriptors."""
    kv = kv_listener()
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
