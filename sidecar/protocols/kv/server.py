"""The KV listener: hypercorn's HTTP protocol code on trio, behind walcar's connection cap.

hypercorn's own `serve` accepts every connection offered to it, so 1,100 idle clients would
take 1,100 descriptors and starve NATS, the admin port and the probes. Here walcar accepts
(`accept_forever`, the memcached/CQL fronts' loop) and hands each connection under the cap
to hypercorn's per-connection server; one over the cap is answered 503 and closed at once.
`idle_timeout` is hypercorn's keep-alive timeout (a connection with no request in flight,
fresh ones included), and its closes are counted for `walcar_front_idle_closed`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import LifespanState
from hypercorn.utils import wrap_app

from sidecar.config import Config, Listener
from sidecar.ingress import Ingress
from sidecar.tcp import ConnectionGate, accept_forever, cap_connections

# hypercorn's keep-alive timeout for a kv listener whose idle_timeout is 0 (the default).
DEFAULT_IDLE_TIMEOUT: Final = 75.0
_TOO_MANY_BODY = b'{"error":"too many connections to this listener (its max_connections)"}'
TOO_MANY: Final = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
                   % (len(_TOO_MANY_BODY), _TOO_MANY_BODY))


class _Connection(TCPServer):
    """hypercorn's connection server, counting the closes its idle timer makes."""

    def __init__(self, gate: ConnectionGate, app: Any, config: HypercornConfig, context: WorkerContext,
                 state: LifespanState, stream: Any) -> None:
        super().__init__(app, config, context, state, stream)
        self.gate = gate

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client is gone. hypercorn's idle timer would keep this connection, and its descriptor,
        # for the rest of keep_alive_timeout: a client that connects and leaves must not hold a slot.
        await self.idle_task.stop()

    async def _initiate_server_close(self) -> None:
        # Called by the idle timer only: on its timeout, or at shutdown (then it is not idleness).
        if not self.context.terminated.is_set():
            self.gate.idle_closed += 1
        await super()._initiate_server_close()


async def serve_kv(app: Callable[..., Awaitable[None]], http: HypercornConfig, listener: Listener, config: Config,
                   ingress: Ingress, shutdown: trio.Event, *,
                   task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on `http`'s bind (TLS when it has a certificate) until `shutdown` is set; in-flight
    requests then get `graceful_timeout` to finish."""
    gate = ConnectionGate("kv", listener.bind, cap_connections(listener, config), TOO_MANY)
    ingress.connection_gates[listener.bind] = gate
    idle = float(listener.idle_timeout)
    http.keep_alive_timeout = idle if idle > 0 else DEFAULT_IDLE_TIMEOUT
    sockets = http.create_sockets()
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(http.backlog)
    ssl_context = http.create_ssl_context()
    listeners: list[Any] = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets.insecure_sockets]
    listeners += [trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(s)), ssl_context,
                                   https_compatible=True) for s in sockets.secure_sockets]
    context = WorkerContext(None)
    handle = partial(_serve_connection, wrap_app(app, http.wsgi_max_body_size, "asgi"), http, context, gate)
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
        connections.cancel_scope.deadline = trio.current_time() + http.graceful_timeout


async def _serve_connection(app: Any, http: HypercornConfig, context: WorkerContext, gate: ConnectionGate,
                            stream: Any) -> None:
    await _Connection(gate, app, http, context, {}, stream).run()
