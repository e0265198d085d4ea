"""ASGI on hypercorn and trio, shared by the KV API, the admin endpoint and the injector."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent

from sidecar.tls import TlsError, reload_certificate
from sidecar.units import parse_hostport

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Our apps hold no state that needs a lifespan: acknowledge startup and shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                    *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


class AnsweredTaskGroup(TaskGroup):
    """hypercorn's per-connection task group; once the app has answered, what it left unread is dropped.

    hypercorn queues a request's body pieces (and, after the answer, `http.disconnect`) for the
    app in a channel of `max_app_queue_size` messages, and waits while it is full. An app that
    answers without reading the whole body (a 413, or a 503 for want of body room) left that
    channel full for good: the connection's reader and the app's own clean-up both waited on
    it, so the connection, its descriptor and its buffers stayed until the sidecar stopped.
    Here the channel is closed once the app has answered (none of our apps reads after that),
    which frees both."""

    async def spawn_app(self, app: Any, config: HypercornConfig, scope: Any,
                        send: Callable[[ASGISendEvent | None], Awaitable[None]]
                        ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        queue, take = trio.open_memory_channel[ASGIReceiveEvent](config.max_app_queue_size)

        async def send_then_drop(message: ASGISendEvent | None) -> None:
            # Closed before the answer's last piece goes: hypercorn queues `http.disconnect` while
            # sending it, from the app's own task. None: the app returned without an answer.
            if message is None or (message["type"] == "http.response.body" and not message.get("more_body")):
                take.close()
            await send(message)

        async def put(message: ASGIReceiveEvent) -> None:
            try:
                await queue.send(message)
            except trio.BrokenResourceError:
                pass  # the app has answered; it will not read this

        assert self._nursery is not None
        self._nursery.start_soon(_handle, app, config, scope, take.receive, send_then_drop,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return put


# Every hypercorn connection (the KV listener, the admin endpoint, the injector) takes its task
# group from here: hypercorn's TCPServer.run names the class from its module.
hypercorn.trio.tcp_server.TaskGroup = AnsweredTaskGroup  # type: ignore[misc]


def hypercorn_config(bind: str, graceful_timeout: float, certfile: str | None = None,
                     keyfile: str | None = None) -> HypercornConfig:
    host, port = parse_hostport(bind)
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None  # our own structured logs say what matters
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 75.0
    # hypercorn closes a keep-alive connection after 1000 requests by default: a sidecar's
    # local clients hold theirs for hours, and reconnecting costs more than the request.
    config.keep_alive_max_requests = 10_000_000
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False  # no software banner to whoever connects
    config.backlog = 1024
    if certfile and keyfile:
        config.certfile = certfile
        config.keyfile = keyfile
    return config


async def serve_http(
    app: Callable[..., Awaitable[None]],
    config: HypercornConfig,
    shutdown: trio.Event,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set; in-flight requests get `graceful_timeout` to finish."""
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)


def serve_tls(config: HypercornConfig, cert_file: str, key_file: str, reload_interval: float,
              nursery: trio.Nursery, where: str = "certificate") -> None:
    """Serve `config` over TLS with this pair, re-read every `reload_interval` once it changed.

    hypercorn builds its context once: it is handed ours, so a reload reaches new handshakes."""
    config.certfile, config.keyfile = cert_file, key_file
    try:
        context = config.create_ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{where}: cannot serve with cert_file {cert_file} and key_file {key_file}: {exc}") from None
    assert context is not None
    config.create_ssl_context = lambda: context  # type: ignore[method-assign]
    nursery.start_soon(reload_certificate, context, cert_file, key_file, reload_interval, where)
