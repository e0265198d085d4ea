"""`walcar run`: open the journal, bind the listeners and the admin endpoint, stop gracefully.

Shutdown (SIGTERM/SIGINT, or `request_shutdown`): readiness fails at once; listeners
keep accepting for `shutdown_grace` (so load balancers see readiness flip first),
then stop accepting; requests already accepted are answered; the journal writer
settles every write it took; the process exits by `shutdown_deadline`.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio

from sidecar.admin.app import AdminApp
from sidecar.admin.state import SidecarState
from sidecar.config import Config, Listener
from sidecar.drain.notices import subscribe_applied
from sidecar.drain.service import DrainService
from sidecar.http import hypercorn_config, serve_http
from sidecar.ingress import Ingress
from sidecar.log.service import open_journal
from sidecar.logs import get_logger
from sidecar.protocols.kv.app import KvApp
from sidecar.reads import Readers

log = get_logger("sidecar")

Role = Literal["ingress", "drain", "all"]
ListenerServer = Callable[..., Awaitable[None]]


class Sidecar:
    def __init__(self, config: Config, role: Role = "all", connect_retry: float = 30.0) -> None:
        self.config = config
        self.role = role
        self.connect_retry = connect_retry
        self.state = SidecarState()
        self._shutdown = trio.Event()
        self._stop_listeners = trio.Event()
        self.ingress: Ingress | None = None
        self.drain: DrainService | None = None
        self._readers = Readers(config)

    def request_shutdown(self, reason: str = "requested") -> None:
        if not self._shutdown.is_set():
            log.info("shutdown_requested", reason=reason)
            self.state.shutting_down = True
            self._shutdown.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        deadline = config.sidecar.shutdown_deadline
        log.info("starting", role=self.role, region=config.sidecar.region, namespaces=",".join(config.namespaces))
        async with trio.open_nursery() as outer:
            outer.start_soon(self._watch_signals)
            admin_stop = trio.Event()
            await outer.start(self._serve_admin, admin_stop)
            async with open_journal(config, connect_retry=self.connect_retry) as journal:
                conn = journal.writer.conn
                self.state.conn = conn
                self.ingress = Ingress(config, journal)
                log.info("journal_ready", nats_url=config.sidecar.nats_url, server_version=conn.server_version)
                ingress_role = self.role in ("ingress", "all")
                if ingress_role:
                    await subscribe_applied(conn, self.ingress.applied, list(config.namespaces))
                async with trio.open_nursery() as services:
                    if self.role in ("drain", "all") and any(ns.targets for ns in config.namespaces.values()):
                        self.drain = await services.start(DrainService(config, journal).run)
                    async with trio.open_nursery() as listeners:
                        if ingress_role:
                            for listener in config.listeners:
                                await listeners.start(self._serve_listener, listener)
                        task_status.started(self)
                        log.info("ready")
                        await self._shutdown.wait()
                        await trio.sleep(config.sidecar.shutdown_grace)
                        log.info("listeners_stopping")
                        self._stop_listeners.set()
                        listeners.cancel_scope.deadline = trio.current_time() + deadline
                    log.info("listeners_stopped")
                    await self._readers.close()
                    if self.drain is not None:
                        await self.drain.stop(deadline)
                    services.cancel_scope.cancel()
            log.info("journal_closed")
            admin_stop.set()
            outer.cancel_scope.cancel()
        log.info("stopped")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request_shutdown(signal.Signals(signum).name)

    async def _serve_admin(self, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn_config(self.config.sidecar.admin, graceful_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_http, AdminApp(self.state), config, stop)
            log.info("admin_bound", bind=self.config.sidecar.admin)
            task_status.started()

    async def _serve_listener(self, listener: Listener, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        name = f"{listener.protocol}@{listener.bind}"
        self.state.listeners_expected.add(name)
        assert self.ingress is not None
        if listener.protocol == "kv":
            app = KvApp(self.ingress, self._readers)
            config = hypercorn_config(listener.bind, graceful_timeout=self.config.sidecar.shutdown_deadline)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_http, app, config, self._stop_listeners)
                self.state.listeners_bound.add(name)
                log.info("listener_bound", protocol=listener.protocol, bind=listener.bind,
                         namespace=listener.namespace or "*")
                task_status.started()
            return
        raise NotImplementedError(f"the {listener.protocol} listener is not built yet")


async def run_sidecar(config: Config, role: Role = "all") -> None:
    await Sidecar(config, role).run()
