"""The KV listener's HTTP/1.1 (walcar's connection server on h11) against a real sidecar and nats-server:
keep-alive and pipelining, `Expect: 100-continue`, chunked bodies, HTTP/1.0, and requests refused
before the app sees them; raw bytes fuzzed at the connection, where no answer may be a 500 or hang."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document, wait_until

NAMESPACE = "http"


@pytest.fixture(scope="module")
def sidecar(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    workdir: Path = tmp_path_factory.mktemp("kv-http")
    document = sidecar_document(services.nats_url, {NAMESPACE: {"partitions": 2}},
                                [{**kv_listener(), "idle_timeout": "3s"}])
    process = SidecarProcess(document, workdir).start()
    yield process
    assert process.stop() == 0
    log = process.log()
    assert "kv_request_failed" not in log and "kv_handler_failed" not in log


def connect(sidecar: SidecarProcess) -> socket.socket:
    host, port = sidecar.document["listeners"][0]["bind"].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def post(key: str, version: bytes = b"1.1") -> bytes:
    body = json.dumps({"key": key, "text": "v"}).encode()
    return (b"POST /v1/log/%s HTTP/%s\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (NAMESPACE.encode(), version, len(body), body))


class Answers:
    """HTTP/1.1 responses read off a raw socket (content-length framed, as walcar answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"closed before a whole head: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            assert self._fill(), "closed before the whole body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buffer and not self._fill()


def test_pipelined_writes_are_answered_in_order_on_one_connection(sidecar: SidecarProcess) -> None:
    with connect(sidecar) as sock:
        sock.sendall(post("p1") + post("p2") + post("p3"))  # one send: three requests in one read
        answers = Answers(sock)
        sequences = []
        for _ in range(3):
            status, headers, body = answers.next()
            assert status == 200 and headers[b"content-type"] == b"application/json" and b"date" in headers
            answer = json.loads(body)
            assert answer["durable"] == "true"
            sequences.append(answer["sequence"])
        assert sequences == sorted(sequences) and len(set(sequences)) == 3  # in order, each its own write
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")  # the connection goes on
        assert answers.next()[0] == 200


def test_expect_100_continue_is_answered_before_the_body_is_sent(sidecar: SidecarProcess) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits (1 s) for the go-ahead."""
    body = json.dumps({"key": "continued", "text": "v" * 2000}).encode()
    with connect(sidecar) as sock:
        sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (NAMESPACE.encode(), len(body)))
        answers = Answers(sock)
        status, _, _ = answers.next()
        assert status == 100
        sock.sendall(body)
        status, _, answer = answers.next()
        assert status == 200 and json.loads(answer)["durable"] == "true"


def test_a_chunked_body_sent_in_pieces_is_written(sidecar: SidecarProcess) -> None:
    body = json.dumps({"key": "chunked", "text": "v" * 300}).encode()
    pieces = [body[:7], body[7:100], body[100:]]
    with connect(sidecar) as sock:
        sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" % NAMESPACE.encode())
        for piece in pieces:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        status, _, answer = Answers(sock).next()
        assert status == 200 and json.loads(answer)["durable"] == "true"


def test_a_body_of_one_byte_chunks_is_written_whole(sidecar: SidecarProcess) -> None:
    body = json.dumps({"key": "tiny-chunks", "text": "v" * 3000}).encode()
    with connect(sidecar) as sock:
        sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" % NAMESPACE.encode()
                     + b"".join(b"1\r\n%s\r\n" % body[n:n + 1] for n in range(len(body))) + b"0\r\n\r\n")
        status, _, answer = Answers(sock).next()
        assert status == 200 and json.loads(answer)["durable"] == "true"


def kv_gauge(sidecar: SidecarProcess, name: str) -> float:
    bind = sidecar.document["listeners"][0]["bind"]
    with urllib.request.urlopen(f"{sidecar.admin}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{bind="{bind}",protocol="kv"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_reset_mid_body_is_not_an_error(sidecar: SidecarProcess) -> None:
    for expect in (b"", b"expect: 100-continue\r\n"):
        sock = connect(sidecar)
        sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n%s"
                     b"content-length: 1000\r\n\r\n{\"key\"" % (NAMESPACE.encode(), expect))
        if expect:
            assert Answers(sock).next()[0] == 100
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, not a FIN
    with connect(sidecar) as sock:
        sock.sendall(post("after-reset"))
        assert Answers(sock).next()[0] == 200
    log = sidecar.log()
    assert "kv_handler_failed" not in log and "kv_request_failed" not in log


def test_a_stalled_body_and_a_client_that_reads_nothing_are_let_go_after_idle_timeout(
        sidecar: SidecarProcess) -> None:
    """idle_timeout is 3 s here: a body that stops coming would hold its room in partial_budget, and
    a client that pipelines without reading would hold its connection (and a graceful shutdown)."""
    closed_before = kv_gauge(sidecar, "walcar_front_idle_closed_total")
    with connect(sidecar) as stalled:
        stalled.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                        b"content-length: 1000\r\n\r\n{\"key\":" % NAMESPACE.encode())
        began = time.monotonic()
        answers = Answers(stalled)
        status, headers, _ = answers.next()  # the app's answer: the body never came
        assert status == 400 and headers.get(b"connection") == b"close"
        assert answers.closed() and time.monotonic() - began < 10
    deaf = connect(sidecar)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.setblocking(False)
    request = b"GET /openapi.json HTTP/1.1\r\nhost: localhost\r\n\r\n" * 200
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # until neither side's buffers take more
        try:
            deaf.send(request)
        except BlockingIOError:
            time.sleep(0.05)
    try:
        wait_until(lambda: kv_gauge(sidecar, "walcar_front_connections") == 0, 15, "the deaf client let go")
        assert kv_gauge(sidecar, "walcar_front_idle_closed_total") >= closed_before + 2
    finally:
        deaf.close()


def test_a_slow_reader_that_keeps_reading_gets_its_whole_answer(sidecar: SidecarProcess) -> None:
    """idle_timeout (3 s) bounds a wait without progress, not the whole answer: ~0.6 MB read at
    ~150 KB/s takes longer than that."""
    body = json.dumps([{"key": f"slow{n}", "text": "v"} for n in range(6000)]).encode()
    with connect(sidecar) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (NAMESPACE.encode(), len(body), body))
        data, began = b"", time.monotonic()
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(1536)
            assert chunk, f"closed after {len(data)} bytes"
            data += chunk
            time.sleep(0.01)
        assert time.monotonic() - began > 3  # slower than idle_timeout as a whole
        results = json.loads(data.split(b"\r\n\r\n", 1)[1])["results"]
        assert len(results) == 6000 and all(r["durable"] == "true" for r in results)


def test_shutdown_does_not_wait_on_idle_connections_or_stalled_bodies(services: Services, tmp_path: Path) -> None:
    document = sidecar_document(services.nats_url, {NAMESPACE: {"partitions": 2}}, [kv_listener()],
                                shutdown_deadline="30s")
    process = SidecarProcess(document, tmp_path / "sidecar").start()
    held = []
    try:
        for n in range(20):
            sock = connect(process)
            if n % 2:  # half of them stall in a body, half wait between requests
                sock.sendall(b"POST /v1/log/%s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                             b"content-length: 100\r\n\r\n{" % NAMESPACE.encode())
            held.append(sock)
        time.sleep(0.5)
        began = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(30) == 0
        assert time.monotonic() - began < 15  # far from the 30 s deadline: nothing waited on these clients
    finally:
        for sock in held:
            sock.close()
        process.stop()


def test_http_1_0_is_answered_and_closed(sidecar: SidecarProcess) -> None:
    with connect(sidecar) as sock:
        sock.sendall(post("old", version=b"1.0"))
        answers = Answers(sock)
        status, _, answer = answers.next()
        assert status == 200 and json.loads(answer)["durable"] == "true"
        assert answers.closed()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /heal\x00thz HTTP/1.1\r\nhost: localhost\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-bad header: 1\r\n\r\n", 400),
    (b"POST /v1/log/http HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
     400),
    # smuggling: a proxy in front may have framed it by either header
    (b"POST /v1/log/http HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"POST /v1/log/http HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: gzip\r\n\r\n", 501),
    (b"GET /healthz HTTP/2.0\r\nhost: localhost\r\n\r\n", 505),
    # over h11_max_incomplete_size (64 KiB) still incomplete; h11 checks between reads (16 KiB)
    (b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-long: " + b"a" * 200_000 + b"\r\n\r\n", 431),
    (b"POST /v1/log/http HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
     b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),  # a broken chunk size: the body ends early
])
def test_a_request_the_codec_refuses_is_answered_and_closed(sidecar: SidecarProcess, request_bytes: bytes,
                                                             status: int) -> None:
    with connect(sidecar) as sock:
        try:
            sock.sendall(request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed while the rest was still on its way: read the answer
        answers = Answers(sock)
        got, headers, _ = answers.next()
        assert got == status and headers.get(b"connection") == b"close"
        assert answers.closed()
    with connect(sidecar) as sock:  # and the listener goes on
        sock.sendall(post("after-refusal"))
        assert Answers(sock).next()[0] == 200


request_lines = st.sampled_from([b"POST /v1/log/http HTTP/1.1", b"GET /healthz HTTP/1.1",
                                 b"PUT /v1/kv/http/r HTTP/1.1", b"GET /v1/kv/http/r?x=1 HTTP/1.0",
                                 b"DELETE / HTTP/1.1", b"POST /v1/log/http HTTP/2.0"])
header_lines = st.lists(st.one_of(
    st.sampled_from([b"host: localhost", b"content-type: application/json", b"content-length: 10", b"content-length: 0",
                     b"transfer-encoding: chunked", b"expect: 100-continue", b"connection: close",
                     b"content-encoding: gzip", b"connection: keep-alive"]),
    st.binary(max_size=30)), max_size=6)
tails = st.one_of(st.binary(max_size=60), st.sampled_from([b'{"key":"k","text":"v"}', b"5\r\nhello\r\n0\r\n\r\n",
                                                            b"0\r\n\r\n", b""]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=request_lines, headers=header_lines, tail=tails, cut=st.integers(0, 400))
def test_raw_requests_get_a_protocol_answer_or_a_close_never_a_500(sidecar: SidecarProcess, line: bytes,
                                                                   headers: list[bytes], tail: bytes, cut: int) -> None:
    raw = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + tail
    raw = raw[:max(cut, len(raw) - cut)]  # sometimes cut short: the server waits, then the client goes
    with connect(sidecar) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # nothing more comes: every wait for more ends
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            return  # closed with our bytes unread: a close is an allowed answer
    for status_line in (part.split(b"\r\n", 1)[0] for part in data.split(b"HTTP/1.1 ")[1:]):
        assert not status_line.startswith(b"5") or status_line[:3] in (b"501", b"503", b"505"), data[:300]
