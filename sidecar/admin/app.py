"""The admin HTTP endpoint (Envoy-style): liveness, readiness."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from sidecar.admin.state import SidecarState

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class AdminApp:
    def __init__(self, state: SidecarState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method == "GET":
            await self._json(send, 200, {"status": "alive"})
        elif path == "/readyz" and method == "GET":
            reasons = self.state.not_ready_reasons()
            if reasons:
                await self._json(send, 503, {"status": "not ready", "reasons": reasons})
            else:
                await self._json(send, 200, {"status": "ready"})
        else:
            await self._json(send, 404, {"error": f"no route for {method} {path}"})

    @staticmethod
    async def _json(send: Send, status: int, body: object) -> None:
        payload = msgspec.json.encode(body)
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        })
        await send({"type": "http.response.body", "body": payload})
