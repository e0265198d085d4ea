"""What the KV listener holds under load stays within the sidecar's documented worst case (issue 18 review).

Real `walcar run` processes and nats-server; memory is the process's VmHWM/VmRSS from /proc.
- Small batch bodies (under 64 KiB, thousands of entries each) from many connections are charged
  ENTRY_BYTES per entry to the listener's partial_budget: the excess is answered 503, and the
  peak stays within `walcar config check`'s worst case.
- Connections whose bodies wait for budget room hold a few reads each (hypercorn's app queue of
  one), within the listener's row: partial_budget + max_connections x CONNECTION_BYTES.
- A request answered before its body was read (503 here) does not leave its connection behind.
- A gzip bomb is inflated a piece at a time and refused at max_body.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from sidecar.memory_budget import CONNECTION_BYTES, MiB, worst_case
from tests.integration import test_front_limits
from tests.integration.test_front_limits import metrics, port_of, readyz
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, build_config, kv_listener, secret_file, sidecar_document, wait_until

start = test_front_limits.start  # the fixture: sidecar processes stopped at the test's end


def peak_mib(sidecar: SidecarProcess) -> float:
    for line in Path(f"/proc/{sidecar.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM line")


def gauge(sidecar: SidecarProcess, name: str, port: int) -> float:
    """A kv listener's walcar_front_* gauge, from /metrics."""
    prefix = f'{name}{{bind="127.0.0.1:{port}",protocol="kv"}} '
    return float(next(line for line in metrics(sidecar).splitlines() if line.startswith(prefix))[len(prefix):])


def post_head(namespace: str, size: int) -> bytes:
    """The head of a msgpack WriteToLog whose body follows."""
    return (f"POST /v1/log/{namespace} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/msgpack\r\n"
            f"content-length: {size}\r\n\r\n").encode()


def small_batch(limit: int = 65_000) -> bytes:
    """A WriteToLog batch of tiny entries just under 64 KiB (~2,500 of them): uncharged as a body."""
    entries: list[dict[str, str]] = []
    size = 2
    while size + 30 < limit:
        entries.append({"key": f"k{len(entries)}", "text": ""})
        size += len(json.dumps(entries[-1], separators=(",", ":"))) + 1
    return json.dumps(entries, separators=(",", ":")).encode()


def test_small_batch_bodies_from_many_connections_stay_within_the_worst_case(start: Any, services: Services,
                                                                             unique: str) -> None:
    kv = kv_listener()
    document = sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv])
    sidecar = start(document, role="ingress")
    port = port_of(kv)
    limit_mib = sum(size for _, size in worst_case(build_config(document), "ingress")) / MiB
    body = small_batch()
    assert len(body) < 64 * 1024
    statuses: list[int] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(3):
            conn.request("POST", f"/v1/log/{unique}", body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 200 or (response.status == 503 and response.getheader("retry-after")), answer
            statuses.append(response.status)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(120)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 360 and 200 in statuses, statuses  # every request answered, some journaled
    assert peak_mib(sidecar) < limit_mib, (peak_mib(sidecar), limit_mib)
    assert readyz(sidecar) == 200


def test_bodies_waiting_for_room_hold_no_more_than_the_listeners_row(start: Any, services: Services,
                                                                     unique: str) -> None:
    """One request holds the whole partial_budget; 150 more send 2 MB bodies and wait for room.
    hypercorn reads each waiting body only as far as its queue of one: the rise stays within
    the listener's row, and every connection is let go once the clients leave."""
    kv = {**kv_listener(), "partial_budget": "16MiB", "partial_wait": "60s", "max_connections": 256}
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]), role="ingress")
    port = port_of(kv)

    holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    for holder in holders:  # the first body of max_body (8 MiB) holds twice that: the whole budget
        holder.sendall(post_head(unique, 8 * MiB) + b"x" * 1000)
    wait_until(lambda: gauge(sidecar, "walcar_front_partial_bytes", port) == 16 * MiB, 10, "the budget held")
    baseline = sidecar.rss_mib()
    waiting = []
    try:
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            pending = memoryview(post_head(unique, 2_000_000) + b"y" * 2_000_000)
            deadline = time.monotonic() + 0.05
            while pending and time.monotonic() < deadline:  # as much as the sidecar and the kernel take
                try:
                    pending = pending[sock.send(pending):]
                except BlockingIOError:
                    time.sleep(0.005)
            waiting.append(sock)
        wait_until(lambda: gauge(sidecar, "walcar_front_connections", port) == 152, 10, "all connected")
        peak = baseline
        for _ in range(10):  # the reads settle within a moment; take the highest
            peak = max(peak, sidecar.rss_mib())
            time.sleep(0.1)
        row = (16 * MiB + len(waiting) * CONNECTION_BYTES) / MiB  # 16 MiB are held by the holders' 2000 bytes
        assert peak - baseline < row, (baseline, peak, row)
    finally:
        for sock in [*waiting, *holders]:
            sock.close()
    wait_until(lambda: gauge(sidecar, "walcar_front_connections", port) == 0, 90, "every connection let go")


def test_a_request_answered_before_its_body_was_read_lets_its_connection_go(start: Any, services: Services,
                                                                            unique: str) -> None:
    """503 for want of room, while the client has sent more of its body than hypercorn queues: the
    connection is let go once the client leaves (the queue, full of unread body, kept it before)."""
    kv = {**kv_listener(), "partial_budget": "8MiB", "partial_wait": "1s", "max_body": "4MiB"}
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]), role="ingress")
    port = port_of(kv)

    holder = socket.create_connection(("127.0.0.1", port), timeout=10)
    holder.sendall(post_head(unique, 4 * MiB) + b"x" * 1000)  # twice its size: the whole budget
    wait_until(lambda: gauge(sidecar, "walcar_front_partial_bytes", port) == 8 * MiB, 10, "the budget held")
    socks = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        pending = memoryview(post_head(unique, 2_000_000) + b"z" * 1_500_000)
        deadline = time.monotonic() + 0.5
        while pending and time.monotonic() < deadline:
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                time.sleep(0.01)
        socks.append(sock)
    try:
        for sock in socks:
            sock.setblocking(True)
            assert sock.recv(4096).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: gauge(sidecar, "walcar_front_connections", port) == 1, 20, "the refused ones let go")
    holder.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):  # a GET leaves its end-of-body message unread: the connection goes on regardless
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()


def test_a_gzip_bomb_is_refused_at_max_body_and_gzip_works_on_every_write_route(start: Any, services: Services,
                                                                                unique: str,
                                                                                tmp_path: Path) -> None:
    token = "region-" + unique
    kv = {**kv_listener(), "max_body": "4MiB"}
    document = sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv],
                                region_token_file=str(secret_file(tmp_path / "region.token", token)))
    sidecar = start(document, role="ingress")
    port = port_of(kv)
    baseline = sidecar.rss_mib()
    bomb = gzip.compress(b"[" + b" " * (64 * MiB) + b"]", 9)  # ~64 KiB that inflates to 64 MiB
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", f"/v1/log/{unique}/batch", body=bomb,
                 headers={"content-type": "application/json", "content-encoding": "gzip",
                          "authorization": f"Bearer {token}"})
    response = conn.getresponse()
    assert response.status == 413 and b"decompressed" in response.read()
    assert peak_mib(sidecar) < baseline + 4 + 8, (baseline, peak_mib(sidecar))  # max_body and its pieces
    conn.request("POST", f"/v1/log/{unique}", body=gzip.compress(json.dumps({"key": "k", "text": "v"}).encode()),
                 headers={"content-type": "application/json", "content-encoding": "gzip"})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["durable"] == "true"


def test_refused_batch_entries_leave_no_garbage_holding_their_payloads(start: Any, services: Services,
                                                                       unique: str) -> None:
    """Batches whose every entry is refused after its payload was made (an unknown target): each refusal
    is an exception whose traceback holds the frame that made the payload. Kept in a local of that frame,
    it was a reference cycle, and the payloads of many requests waited for the cyclic GC (+48 MiB here)."""
    kv = kv_listener()
    sidecar = start(sidecar_document(services.nats_url, {unique: {"partitions": 2}}, [kv]), role="ingress")
    body = msgspec.msgpack.encode([{"key": f"k{n}", "text": "x" * 1_000_000, "target": ["nope"]} for n in range(7)])
    baseline = sidecar.rss_mib()
    conn = http.client.HTTPConnection("127.0.0.1", port_of(kv), timeout=60)
    for _ in range(40):
        conn.request("POST", f"/v1/log/{unique}", body=body, headers={"content-type": "application/msgpack"})
        response = conn.getresponse()
        assert response.status == 400 and b"has no target(s) nope" in response.read()
    # The body, its decoded entries and their payloads, once: about three bodies of 7 MB.
    assert peak_mib(sidecar) - baseline < 3 * 8, (baseline, peak_mib(sidecar))
