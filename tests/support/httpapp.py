"""A real upstream application for the `http` target's tests: hypercorn on trio, in the test's process.

It applies what walcar sends the way an application should: once per `Idempotency-Key`
(a redelivered entry is answered 200 and not applied again), and records everything it
was sent. It fails on demand: a status for everything (an outage behind a gateway),
a status for some keys (a refusal), or "apply, then lose the answer" for some keys
(which makes walcar send the same entry again). `stop()` closes its port; `start()`
serves again on the same port with the same state.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import trio

from sidecar.http import hypercorn_config, respond, serve_http, serve_lifespan
from tests.support.procs import free_port


@dataclass
class Received:
    """One entry as the application got it (a batched request yields one per item)."""

    id: str
    key: str
    op: str
    value: bytes
    seq: int
    write_time: int
    origin: str
    content_type: str
    path: str
    headers: dict[str, str]


@dataclass
class RecordingApp:
    received: list[Received] = field(default_factory=list)  # every delivery, duplicates included
    applied: dict[str, list[bytes]] = field(default_factory=dict)  # key -> values applied, in order
    ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    requests: int = 0
    outage: int | None = None  # answer every request with this status
    retry_after: str | None = None  # with the outage's answers
    refuse: dict[str, int] = field(default_factory=dict)  # key -> status answered for it
    lose_answer: set[str] = field(default_factory=set)  # keys whose first delivery is applied, then answered 500
    _lost: set[str] = field(default_factory=set)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.outage is not None:
            extra = [(b"retry-after", self.retry_after.encode())] if self.retry_after else []
            await respond(send, self.outage, b'{"error": "down for maintenance"}', headers=extra)
            return
        path = scope["raw_path"].decode()
        if headers.get("content-type") in ("application/json", "application/x-ndjson"):
            items = self._batch_items(body, headers, path)
        else:
            items = [Received(
                id=headers["idempotency-key"], key=unquote(headers["walcar-key"]), op=headers["walcar-op"],
                value=body, seq=int(headers["walcar-sequence"]), write_time=int(headers["walcar-write-time"]),
                origin=unquote(headers.get("walcar-origin", "")), content_type=headers.get("content-type", ""),
                path=path, headers=headers)]
        for item in items:
            status = self.refuse.get(item.key)
            if status is not None:
                await respond(send, status, f"refused key {item.key}: invalid value".encode())
                return
        lost = False
        for item in items:
            self.received.append(item)
            if item.id in self.ids:
                self.duplicates += 1
                continue
            self.ids.add(item.id)
            self.applied.setdefault(item.key, []).append(item.value)
            if item.key in self.lose_answer and item.id not in self._lost:
                self._lost.add(item.id)
                lost = True
        if lost:
            await respond(send, 500, b"applied, but the answer got lost")
            return
        await respond(send, 200, b'{"ok": true}')

    def _batch_items(self, body: bytes, headers: dict[str, str], path: str) -> list[Received]:
        if headers["content-type"] == "application/json":
            objects = json.loads(body)
        else:
            objects = [json.loads(line) for line in body.splitlines() if line]
        return [Received(id=o["id"], key=o["key"], op=o["op"],
                         value=base64.b64decode(o["value"]) if o.get("value") is not None else b"",
                         seq=o["seq"], write_time=o["write_time"], origin=o.get("origin", ""),
                         content_type=o.get("content_type", ""), path=path, headers=headers) for o in objects]


class AppServer:
    """The app on 127.0.0.1:<port>, stoppable and restartable inside the test's nursery."""

    def __init__(self, app: RecordingApp, nursery: trio.Nursery, port: int | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.app = app
        self.nursery = nursery
        self.port = port or free_port()
        self.tls = tls  # (certfile, keyfile): serve https
        self._shutdown: trio.Event | None = None
        self._stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._shutdown, self._stopped = trio.Event(), trio.Event()
        shutdown, stopped = self._shutdown, self._stopped

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                config = hypercorn_config(f"127.0.0.1:{self.port}", 0.5, *(self.tls or ()))
                await serve_http(self.app, config, shutdown, task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(serve)

    async def stop(self) -> None:
        assert self._shutdown is not None and self._stopped is not None
        self._shutdown.set()
        await self._stopped.wait()


@asynccontextmanager
async def served(app: RecordingApp, tls: tuple[str, str] | None = None) -> AsyncIterator[AppServer]:
    """The app served for the block (stoppable and restartable inside it)."""
    async with trio.open_nursery() as nursery:
        server = AppServer(app, nursery, tls=tls)
        await server.start()
        try:
            yield server
        finally:
            if server._shutdown is not None:
                server._shutdown.set()
