"""One listener's serve function over a real journal, as the sidecar wires it, on a trio loop in a thread.

For tests that drive a front with blocking clients (cassandra-driver, pymemcache, raw sockets)."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Self

import trio

from sidecar.config import Config
from sidecar.ingress import Ingress
from sidecar.log.service import open_journal

Serve = Callable[..., Awaitable[None]]  # serve_cql / serve_memcached: (listener, ingress, config, stop, task_status)


class ListenerThread:
    def __init__(self, config: Config, serve: Serve) -> None:
        self.config = config
        self.serve = serve
        self.listener = config.listeners[0]
        self.port = int(self.listener.bind.rpartition(":")[2])
        self.ingress: Ingress | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"{self.listener.protocol} listener did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # surfaced by start() to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_journal(self.config, connect_retry=5.0) as journal:
            self.ingress = Ingress(self.config, journal)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.serve, self.listener, self.ingress, self.config, self._stop)
                self._ready.set()

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(30)
