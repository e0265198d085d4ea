"""The webhook over HTTPS: POST /mutate, GET /healthz, GET /readyz (hypercorn on trio).

The ASGI app is a thin shell around `Injector.handle`; whatever arrives, the answer
is an AdmissionReview (400 only for a body that is not JSON, 413 for one too large),
never a 500. The serving certificate is re-read when its files change (cert-manager
or a Helm upgrade rotates the Secret; kubelet updates the mount), so rotation needs
no restart.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from sidecar.http import Receive, Scope, Send, hypercorn_config, respond, serve_http, serve_lifespan, serve_tls
from sidecar.inject.patch import Injector
from sidecar.inject.settings import InjectorSettings
from sidecar.logs import get_logger

log = get_logger("inject")


MAX_BODY = 8 * 1024 * 1024  # the API server caps an object at ~3 MiB; a review wraps one or two


class InjectorApp:
    def __init__(self, injector: Injector, max_body: int = MAX_BODY) -> None:
        self.injector = injector
        self.max_body = max_body
        self.ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/mutate":
            if method != "POST":
                await _json(send, 405, {"error": "POST an AdmissionReview to /mutate"})
                return
            await self._mutate(receive, send)
        elif path == "/healthz" and method == "GET":
            await _json(send, 200, {"status": "alive"})
        elif path == "/readyz" and method == "GET":
            if self.ready:
                await _json(send, 200, {"status": "ready"})
            else:
                await _json(send, 503, {"status": "not ready"})
        else:
            await _json(send, 404, {"error": f"no route for {method} {path}"})

    async def _mutate(self, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _json(send, 413, {"error": f"request body over {self.max_body} bytes"})
                return
            if not message.get("more_body", False):
                break
        status, review, decision = self.injector.handle(bytes(body))
        fields = dict(decision.pod)
        if decision.message:
            fields["reason"] = decision.message
        if decision.warnings:
            fields["warnings"] = "; ".join(decision.warnings)
        log.info("admission", outcome=decision.outcome, allowed=decision.allowed, uid=review["response"]["uid"],
                 ms=round((time.perf_counter() - started) * 1000, 2), **fields)
        await _json(send, status, review)


async def _json(send: Send, status: int, body: object) -> None:
    await respond(send, status, json.dumps(body).encode())


async def serve(settings: InjectorSettings, injector: Injector, shutdown: trio.Event, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the webhook until `shutdown` is set; readiness fails first so Service endpoints move away."""
    config = hypercorn_config(settings.bind, graceful_timeout=5.0, certfile=settings.cert_file,
                              keyfile=settings.key_file)
    app = InjectorApp(injector)
    stop_http = trio.Event()
    async with trio.open_nursery() as background:
        if settings.cert_file and settings.key_file:
            serve_tls(config, settings.cert_file, settings.key_file, float(settings.cert_reload_interval), background)
        async with trio.open_nursery() as http:
            await http.start(serve_http, app, config, stop_http)
            app.ready = True
            log.info("injector_ready", bind=settings.bind, tls=bool(settings.cert_file), image=settings.image,
                     native_sidecar=settings.native_sidecar)
            task_status.started()
            await shutdown.wait()
            app.ready = False
            log.info("injector_stopping")
            await trio.sleep(1.0)  # let a readiness probe see 503 before the socket closes
            stop_http.set()
            http.cancel_scope.deadline = trio.current_time() + config.graceful_timeout + 1
        background.cancel_scope.cancel()
    log.info("injector_stopped")
