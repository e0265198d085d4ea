"""The KV listener: hypercorn's HTTP protocol code on trio, behind walcar's connection cap.

hypercorn's own `serve` accepts every connection offered to it, so 1,100 idle clients would
take 1,100 descriptors and starve NATS, the admin port and the probes. Here walcar accepts
(`accept_forever`, the memcached/CQL fronts' loop) and hands each connection under the cap
to hypercorn's per-connection server; one over the cap is answered 503 and closed at once.
`idle_timeout` is hypercorn's keep-alive timeout (a connection with no request in flight,
fresh ones included), and its closes are counted for `walcar_front_idle_closed`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio import tcp_server
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import LifespanState
from hypercorn.utils import wrap_app

from sidecar.config import Config, Listener
from sidecar.http import AnsweredTaskGroup
from sidecar.ingress import Ingress
from sidecar.tcp import ConnectionGate, accept_forever, cap_connections

# hypercorn's keep-alive timeout for a kv listener whose idle_timeout is 0 (the default).
DEFAULT_IDLE_TIMEOUT: Final = 75.0
# Body pieces (64 KiB reads) hypercorn queues for the app. While a request waits for room in
# partial_budget it reads nothing, and hypercorn's default of 10 held ~0.8 MB of its body per
# connection uncharged; one is the least that works (an answer's `http.disconnect` needs a place).
APP_QUEUE: Final = 1
# One read from a client (hypercorn's is 64 KiB). What a connection holds uncharged is a few
# copies of two reads (memory_budget.CONNECTION_BYTES); large bodies take 4x the reads, each short.
READ_BYTES: Final = 16 * 1024
_TOO_MANY_BODY = b'{"error":"too many connections to this listener (its max_connections)"}'
TOO_MANY: Final = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
                   % (len(_TOO_MANY_BODY), _TOO_MANY_BODY))


class _IdleTimer:
    """hypercorn's idle timer (its `idle_task`) without a task per request.

    hypercorn stops its timer task when a request arrives and starts a new one (a lock, a cancel
    and a task spawn) after every answer. Here one task per connection sleeps in a cancel scope
    whose deadline those calls move: infinite while a request is in flight."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.deadline = math.inf
        self.scope: trio.CancelScope | None = None
        self.finished = False

    async def restart(self, task_group: Any, _action: Any) -> None:
        terminated = self.connection.context.terminated.is_set()  # shutting down: an idle connection goes now
        self.deadline = trio.current_time() + (0.0 if terminated else self.connection.config.keep_alive_timeout)
        if self.scope is None:
            self.scope = trio.CancelScope()
            task_group.spawn(self._watch, self.scope)
        self.scope.deadline = self.deadline

    async def stop(self) -> None:
        self.deadline = math.inf
        if self.scope is not None:
            self.scope.deadline = math.inf

    def expire_if_idle(self) -> None:
        if self.deadline != math.inf and self.scope is not None:
            self.scope.deadline = -math.inf

    def finish(self) -> None:
        """The connection is over: the timer goes without closing anything."""
        self.finished = True
        if self.scope is not None:
            self.scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        if not self.finished:
            with trio.CancelScope(shield=True):
                await self.connection._initiate_server_close()


class _Connection(TCPServer):
    """hypercorn's connection server with a cheaper idle timer, counting the closes it makes, and
    a response's head sent with its body (one send instead of two)."""

    def __init__(self, gate: ConnectionGate, idle: set[_IdleTimer], app: Any, config: HypercornConfig,
                 context: WorkerContext, state: LifespanState, stream: Any) -> None:
        super().__init__(app, config, context, state, stream)
        self.gate = gate
        self.idle_task = _IdleTimer(self)  # type: ignore[assignment]
        self.idle_timers = idle
        self.held = b""  # a response head waiting for its first body bytes

    async def run(self) -> None:
        self.idle_timers.add(self.idle_task)  # type: ignore[arg-type]
        try:
            await super().run()
        finally:
            self.idle_timers.discard(self.idle_task)

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, RawData):
            data = event.data
            if not self.held and _is_final_head(data):
                self.held = data  # an HTTP/1.1 head: h11 hands the body over next, in the same task
                return
            if self.held:
                event = RawData(data=self.held + data)
                self.held = b""
        elif self.held:  # anything else first sends what is held
            held, self.held = self.held, b""
            await super().protocol_send(RawData(data=held))
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        """hypercorn's reader with smaller reads: a connection waiting on its app holds a read in the
        app's queue and one more on its way there, in several copies each (trio's, hypercorn's, h11's)."""
        try:
            while True:
                try:
                    with trio.fail_after(self.config.read_timeout or math.inf):
                        data = await self.stream.receive_some(READ_BYTES)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if not data:
                    break
            await self.protocol.handle(Closed())
        finally:
            # The client is gone (or the server closed). hypercorn's idle timer would keep this
            # connection, and its descriptor, for the rest of keep_alive_timeout.
            self.idle_task.finish()  # type: ignore[attr-defined]

    async def _initiate_server_close(self) -> None:
        # Called by the idle timer only: on its timeout, or at shutdown (then it is not idleness).
        if not self.context.terminated.is_set():
            self.gate.idle_closed += 1
        await super()._initiate_server_close()


def _is_final_head(data: bytes) -> bool:
    """An HTTP/1.1 response head that is not informational (a 100 Continue must go out at once)."""
    return data.startswith(b"HTTP/1.1 ") and data[9:10] != b"1" and data.endswith(b"\r\n\r\n")


async def serve_kv(app: Callable[..., Awaitable[None]], http: HypercornConfig, listener: Listener, config: Config,
                   ingress: Ingress, shutdown: trio.Event, *,
                   task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on `http`'s bind (TLS when it has a certificate) until `shutdown` is set; in-flight
    requests then get `graceful_timeout` to finish."""
    gate = ConnectionGate("kv", listener.bind, cap_connections(listener, config), TOO_MANY,
                          getattr(app, "body_budget", None))
    ingress.connection_gates[listener.bind] = gate
    idle_seconds = float(listener.idle_timeout)
    http.keep_alive_timeout = idle_seconds if idle_seconds > 0 else DEFAULT_IDLE_TIMEOUT
    http.max_app_queue_size = APP_QUEUE
    # A queue of one holds a GET's end-of-body message that the app never reads: only the task group
    # that drops it once the app has answered keeps such a connection from hanging (sidecar.http).
    assert tcp_server.TaskGroup is AnsweredTaskGroup
    sockets = http.create_sockets()
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(http.backlog)
    ssl_context = http.create_ssl_context()
    listeners: list[Any] = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets.insecure_sockets]
    if ssl_context is not None:
        listeners += [trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(s)), ssl_context,
                                       https_compatible=True) for s in sockets.secure_sockets]
    context = WorkerContext(None)
    idle: set[_IdleTimer] = set()
    handle = partial(_serve_connection, wrap_app(app, http.wsgi_max_body_size, "asgi"), http, context, gate, idle)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as acceptors:
            for item in listeners:
                acceptors.start_soon(accept_forever, item, handle, connections, "kv", gate)
            task_status.started()
            await shutdown.wait()
            acceptors.cancel_scope.cancel()
        for item in listeners:
            await item.aclose()
        await context.terminated.set()  # idle keep-alive connections close now, busy ones after their answer
        for timer in list(idle):
            timer.expire_if_idle()
        connections.cancel_scope.deadline = trio.current_time() + http.graceful_timeout


async def _serve_connection(app: Any, http: HypercornConfig, context: WorkerContext, gate: ConnectionGate,
                            idle: set[_IdleTimer], stream: Any) -> None:
    await _Connection(gate, idle, app, http, context, {}, stream).run()
