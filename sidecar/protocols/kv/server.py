"""The KV listener: HTTP/1.1 on h11 (the sans-I/O codec), one trio task per connection.

The app runs in its connection's task and reads its body from h11 as it asks for it; its answer
goes out in one send. hypercorn's connection server, used here before, spent more per request
than the write itself: a task spawned for the app, the body through a memory channel, a lock and
a cancel scope per send, an idle timer moved twice (docs/benchmarks.md, *KV API: its own HTTP/1.1
server*). The admin endpoint and the injector stay on hypercorn: they are not on a write's path.

walcar accepts (`accept_forever`, the memcached/CQL fronts' loop) up to the listener's cap; one
over the cap is answered 503 and closed at once. `idle_timeout` bounds the wait for a request's
head, from the connection's start or its last answer (a slow head is not a way to stay), the wait
for each next piece of a body, and for the client to take an answer; those closes are counted for
`walcar_front_idle_closed`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import unquote
from wsgiref.handlers import format_date_time

import h11
import trio
from hypercorn.config import Config as HypercornConfig

from sidecar.config import Config, Listener
from sidecar.ingress import Ingress
from sidecar.logs import get_logger
from sidecar.tcp import ConnectionGate, accept_forever, cap_connections

log = get_logger("kv")

# The wait for a request's head on a kv listener whose idle_timeout is 0 (the default).
DEFAULT_IDLE_TIMEOUT: Final = 75.0
# One read from a client. A connection holds at most one read beside h11's buffer: nothing is
# read ahead of what the app asks for (memory_budget.CONNECTION_BYTES).
READ_BYTES: Final = 16 * 1024
# What TLS offers in ALPN: HTTP/1.1 only (hypercorn's default offers h2 first, which this server does not speak).
KV_ALPN: Final = ("http/1.1",)
# How long a closing connection keeps reading (and dropping) what its client still sends.
LINGER_SECONDS: Final = 1.0
# An answer is sent in slices this big, each with idle_timeout to go: a slow reader is not a stalled one.
WRITE_SLICE: Final = 64 * 1024
# Body chunks parsed in one step of the loop: one 16 KiB read can hold ~2,700 one-byte chunks.
CHUNKS_A_STEP: Final = 64
_TOO_MANY_BODY = b'{"error":"too many connections to this listener (its max_connections)"}'
TOO_MANY: Final = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
                   % (len(_TOO_MANY_BODY), _TOO_MANY_BODY))
_DISCONNECT: Final = {"type": "http.disconnect"}
_ASGI: Final = {"version": "3.0", "spec_version": "2.1"}
_NO_BODY_STATUS: Final = frozenset({204, 304})
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
_STREAM_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class _Date:
    """The Date header (RFC 9110 wants it), formatted once a second rather than once a request."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, format_date_time(second).encode("ascii")
        return cls.value


class _Listening:
    """What a listener's connections share: the gate, the waits, and shutdown. Once shutting down, a
    connection waiting for a head closes now, one waiting for its body gets LINGER_SECONDS a piece
    (a stalled body must not hold shutdown to its deadline), a busy one closes after its answer."""

    def __init__(self, app: App, gate: ConnectionGate, idle_timeout: float, max_head: int) -> None:
        self.app = app
        self.gate = gate
        self.idle_timeout = idle_timeout
        self.max_head = max_head
        self.closing = False
        self.waiting: set[trio.CancelScope] = set()  # for a head
        self.body_waits: set[trio.CancelScope] = set()

    def close(self) -> None:
        self.closing = True
        for scope in self.waiting:
            scope.cancel()
        soon = trio.current_time() + LINGER_SECONDS
        for scope in self.body_waits:
            scope.deadline = min(scope.deadline, soon)


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Connection:
    def __init__(self, listening: _Listening, stream: trio.abc.Stream, secure: bool) -> None:
        self.listening = listening
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=listening.max_head)
        self.scheme = "https" if secure else "http"
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        self.client = _address(sock.getpeername) if sock is not None else None
        self.server = _address(sock.getsockname) if sock is not None else None
        self._reset()

    def _reset(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_sent = False
        self.no_body = False
        self.body_done = False
        self.answered = False
        self.given_up = False  # its body stopped coming: the answer gets a moment, not idle_timeout

    async def run(self) -> None:
        gone = False
        try:
            while await self._serve_one():
                self.h11.start_next_cycle()
                self._reset()
        except _BadRequest as bad:
            await self._refuse(bad.status)
        except _STREAM_GONE:
            gone = True  # the client went (reset, a TLS handshake that failed, or too slow: _write)
        finally:
            try:
                if not gone and self._client_may_be_sending():
                    await self._linger()
            finally:
                with trio.move_on_after(1.0) as cleanup:
                    cleanup.shield = True  # a TLS close_notify must not wait on a client that does not read
                    await self.stream.aclose()

    def _client_may_be_sending(self) -> bool:
        """After an answer, or mid-request. Not a connection idle between requests (timed out, or the
        listener closing): no answer of it is on its way to be lost, and a pooled client that reads
        nothing would hold the close (and shutdown) for the whole linger."""
        their, ours = self.h11.their_state, self.h11.our_state
        return their in (h11.SEND_BODY, h11.ERROR, h11.DONE) or ours in (h11.DONE, h11.MUST_CLOSE) or bool(
            self.h11.trailing_data[0])

    async def _linger(self) -> None:
        """Closing while the client may still be sending (a 413 before its body's end, requests
        pipelined behind a `connection: close`): closing with its bytes unread would reset the
        connection, and the client would lose the answer it has not read yet. Stop sending and
        discard what comes until it closes too, for a moment."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                if isinstance(self.stream, trio.SocketStream):
                    await self.stream.send_eof()
                while await self.stream.receive_some(READ_BYTES):
                    pass
            except (*_STREAM_GONE, OSError):
                pass

    async def _serve_one(self) -> bool:
        """Serve one request; whether the connection takes another."""
        request = await self._request()
        if request is None:
            return False
        if request.http_version not in (b"1.1", b"1.0"):
            raise _BadRequest(505)  # h11 parses any version; HTTP/2 is not served here
        headers = list(request.headers)
        framing = [name for name, _ in headers if name in _FRAMING]
        if len(framing) > 1 and b"transfer-encoding" in framing and b"content-length" in framing:
            # RFC 9112 6.3: either may be what a proxy in front believed; refuse rather than pick one.
            raise _BadRequest(400)
        target = request.target
        path, _, query = target.partition(b"?")
        method = request.method.decode("ascii")
        self.no_body = method == "HEAD"
        scope = {
            "type": "http", "asgi": _ASGI, "http_version": request.http_version.decode("ascii"),
            "method": method, "scheme": self.scheme, "path": _unquote(path), "raw_path": path,
            "query_string": query, "root_path": "", "headers": headers,
            "client": self.client, "server": self.server, "extensions": {},
        }
        try:
            await self.listening.app(scope, self._receive, self._send)
        except _STREAM_GONE:
            raise
        except Exception as exc:  # a bug in the app: its answer, if not begun, is a 500
            log.error("kv_request_failed", exc_info=True, path=scope["path"], error=str(exc))
            if not self.head_sent:
                await self._refuse(500)
            return False
        if not self.answered:
            if not self.head_sent:
                await self._refuse(500)  # the app returned without answering
            return False
        # our_state: HTTP/1.0 without keep-alive, or `connection: close` either way, leave h11 at MUST_CLOSE.
        return not self.listening.closing and self._request_read() and self.h11.our_state is h11.DONE

    def _request_read(self) -> bool:
        """Whether the request is read to its end: a body the app left unread goes if it is in hand
        already (a GET's empty one); one still coming (an early 413) leaves the client mid-message."""
        try:
            while self.h11.their_state is h11.SEND_BODY:
                event = self._next()
                if event is h11.NEED_DATA:
                    return False
        except _BadRequest:
            return False
        return self.h11.their_state is h11.DONE

    async def _request(self) -> h11.Request | None:
        """The next request's head; None once the client closes, or its time (or the listener's) is up."""
        if self.listening.closing:
            return None
        deadline = trio.current_time() + self.listening.idle_timeout  # for the whole head
        while True:
            event = self._next()
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA or not await self._read_by(deadline, self.listening.waiting):
                return None  # the client closed, or its time (or the listener's) is up

    def _next(self) -> Any:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _BadRequest(exc.error_status_hint) from None

    async def _read(self) -> None:
        data = await self.stream.receive_some(READ_BYTES)
        self.h11.receive_data(data if isinstance(data, bytes) else bytes(data))

    async def _write(self, data: bytes) -> None:
        """Send a slice at a time; a client that takes none of a slice for idle_timeout is given up (its
        answers would pile up). A slow reader that keeps reading gets its whole answer."""
        wait = LINGER_SECONDS if self.given_up else self.listening.idle_timeout
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            with trio.move_on_after(wait):
                await self.stream.send_all(view[start:start + WRITE_SLICE])
                continue
            if not self.given_up:
                self.listening.gate.idle_closed += 1
            self.given_up = True
            raise trio.BrokenResourceError("the client took nothing of its answer for idle_timeout")

    async def _read_by(self, deadline: float, waits: set[trio.CancelScope]) -> bool:
        """Read more, in a wait the listener can cut short (`waits`); False once the deadline passed first,
        counted as an idle close unless the listener is closing."""
        with trio.CancelScope(deadline=deadline) as waiting:
            waits.add(waiting)
            try:
                await self._read()
                return True
            finally:
                waits.discard(waiting)
        if not self.listening.closing:
            self.listening.gate.idle_closed += 1
        return False

    async def _read_body(self) -> bool:
        """Read the next piece of a body; False once none came for idle_timeout (LINGER_SECONDS a piece
        once the listener closes)."""
        wait = LINGER_SECONDS if self.listening.closing else self.listening.idle_timeout
        if await self._read_by(trio.current_time() + wait, self.listening.body_waits):
            return True
        self.given_up = True  # the body stopped coming
        return False

    async def _receive(self) -> dict[str, Any]:
        """ASGI's receive: what is in hand of the body (read when nothing is), its end marked; then
        `http.disconnect` at once (no app here waits on a disconnect after reading its body)."""
        if self.body_done or self.answered:
            return _DISCONNECT
        pieces: list[bytes] = []
        try:
            if self.h11.they_are_waiting_for_100_continue:
                await self._write(self.h11.send(h11.InformationalResponse(
                    status_code=100, headers=[(b"date", _Date.now())])) or b"")
            while True:
                event = self._next()
                if isinstance(event, h11.Data):
                    pieces.append(event.data)
                    if not len(pieces) % CHUNKS_A_STEP:
                        await trio.lowlevel.checkpoint()  # a body of tiny chunks: h11 parses each one
                elif event is h11.NEED_DATA and not pieces:
                    if not await self._read_body():
                        return _DISCONNECT
                else:
                    break
        except _BadRequest:
            return _DISCONNECT  # a broken body: the app answers 400 and the connection closes
        except _STREAM_GONE:
            return _DISCONNECT  # the client went mid-body: the app's answer finds it gone
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        if event is h11.NEED_DATA:
            return {"type": "http.request", "body": bytes(body), "more_body": True}
        return _DISCONNECT  # the client closed mid-body

    async def _send(self, message: dict[str, Any]) -> None:
        """ASGI's send: the head is held until the body's first piece, and goes with it."""
        kind = message["type"]
        if kind == "http.response.start" and self.status is None:
            self.status = int(message["status"])
            self.headers = [*message.get("headers", ()), (b"date", _Date.now())]
            self.no_body = self.no_body or self.status in _NO_BODY_STATUS
            return
        if kind != "http.response.body" or self.status is None or self.answered:
            raise RuntimeError(f"unexpected ASGI message {kind!r} for this response")
        out = b""
        if not self.head_sent:
            if self.listening.closing or not self._request_read():
                self.headers.append((b"connection", b"close"))  # the client learns it will not be reused
            out = self.h11.send(h11.Response(status_code=self.status, headers=self.headers)) or b""
            self.head_sent = True
        body = message.get("body", b"")
        if body and not self.no_body:
            out += self.h11.send(h11.Data(data=body)) or b""
        if not message.get("more_body", False):
            out += self.h11.send(h11.EndOfMessage()) or b""
            self.answered = True
        await self._write(out)

    async def _refuse(self, status: int) -> None:
        """An answer without a body that closes the connection: a head h11 refused, or an app's failure."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [(b"content-length", b"0"), (b"connection", b"close"), (b"date", _Date.now())]
        try:
            data = (self.h11.send(h11.Response(status_code=status, headers=headers)) or b"") + (
                self.h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            return
        with trio.move_on_after(1.0):  # a client that does not read must not hold us
            try:
                await self.stream.send_all(data)
            except (*_STREAM_GONE, OSError):
                pass


def _address(get: Callable[[], Any]) -> tuple[str, int] | None:
    try:
        address = get()
    except OSError:
        return None
    return (address[0], address[1]) if isinstance(address, tuple) else None


def _unquote(path: bytes) -> str:
    return unquote(path.decode("latin-1"))  # h11 lets only visible ASCII through: latin-1 cannot fail


async def serve_kv(app: App, http: HypercornConfig, listener: Listener, config: Config,
                   ingress: Ingress, shutdown: trio.Event, *,
                   task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on `http`'s bind (TLS when it has a certificate) until `shutdown` is set; in-flight
    requests then get `graceful_timeout` to finish."""
    gate = ConnectionGate("kv", listener.bind, cap_connections(listener, config), TOO_MANY,
                          getattr(app, "body_budget", None))
    ingress.connection_gates[listener.bind] = gate
    idle_seconds = float(listener.idle_timeout)
    listening = _Listening(app, gate, idle_seconds if idle_seconds > 0 else DEFAULT_IDLE_TIMEOUT,
                           http.h11_max_incomplete_size)
    sockets = http.create_sockets()
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(http.backlog)
    ssl_context = http.create_ssl_context()
    listeners: list[tuple[Any, bool]] = [
        (trio.SocketListener(trio.socket.from_stdlib_socket(s)), False) for s in sockets.insecure_sockets]
    if ssl_context is not None:
        listeners += [(trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(s)), ssl_context,
                                        https_compatible=True), True) for s in sockets.secure_sockets]

    async def plain(stream: trio.abc.Stream) -> None:
        await _Connection(listening, stream, secure=False).run()

    async def secure(stream: trio.abc.Stream) -> None:
        await _Connection(listening, stream, secure=True).run()

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as acceptors:
            for item, is_secure in listeners:
                acceptors.start_soon(accept_forever, item, secure if is_secure else plain, connections, "kv", gate)
            task_status.started()
            await shutdown.wait()
            acceptors.cancel_scope.cancel()
        for item, _ in listeners:
            await item.aclose()
        listening.close()  # connections waiting for a head close now, busy ones after their answer
        connections.cancel_scope.deadline = trio.current_time() + http.graceful_timeout
