"""`walcar run`: open the journal, bind the listeners and the admin endpoint, stop gracefully.

Shutdown (SIGTERM/SIGINT, or `request_shutdown`): readiness fails at once; listeners
keep accepting for `shutdown_grace` (so load balancers see readiness flip first),
then stop accepting; requests already accepted are answered; the journal writer
settles every write it took; the process exits by `shutdown_deadline`.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import msgspec
import trio

from sidecar import config as config_mod
from sidecar import memory_budget
from sidecar.admin.app import AdminApp
from sidecar.admin.dlq import DeadLetters
from sidecar.admin.state import SidecarState
from sidecar.admin.status import StatusPoller
from sidecar.config import Config, Listener, Namespace
from sidecar.control.live import LiveNamespaces
from sidecar.control.store import ControlError, NamespaceStore, unsafe_changes
from sidecar.drain.notices import subscribe_applied
from sidecar.drain.pauses import Pauses
from sidecar.drain.service import DrainService
from sidecar.http import hypercorn_config, serve_http, serve_tls
from sidecar.ingress import Ingress
from sidecar.log.journal import Journal
from sidecar.log.service import open_journal
from sidecar.log.streams import provision_namespace
from sidecar.logs import get_logger
from sidecar.protocols.kv.app import KvApp
from sidecar.protocols.kv.server import KV_ALPN, serve_kv
from sidecar.reads import Readers
from sidecar.secrets import read_token_file
from sidecar.tcp import ByteBudget

log = get_logger("sidecar")

Role = Literal["ingress", "drain", "all"]


class Sidecar:
    def __init__(self, config: Config, role: Role = "all", connect_retry: float = 30.0,
                 config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP (namespaces only)
        self.live: LiveNamespaces | None = None
        self.role = role
        self.connect_retry = connect_retry
        self.state = SidecarState()
        self._shutdown = trio.Event()
        self._stop_listeners = trio.Event()
        self.ingress: Ingress | None = None
        self.drain: DrainService | None = None
        self.pauses: Pauses | None = None
        self.poller: StatusPoller | None = None
        self.dead_letters: DeadLetters | None = None
        self._readers = Readers(config)
        self._replays: list[Any] = []
        self._services: trio.Nursery | None = None
        settings = config.sidecar
        self._admin_token = _read_secret(settings.admin_token_file, create=settings.admin_token_create)
        self._region_token = _read_secret(settings.region_token_file)
        if role in ("ingress", "all"):
            # Known up front, so readiness cannot pass before the last listener is bound.
            self.state.listeners_expected.update(_listener_name(item) for item in config.listeners)

    def request_shutdown(self, reason: str = "requested") -> None:
        if not self._shutdown.is_set():
            log.info("shutdown_requested", reason=reason, deadline=str(self.config.sidecar.shutdown_deadline))
            self.state.shutting_down = True
            self._shutdown.set()

    def replay_progress(self) -> list[Any]:
        return [job.progress for job in self._replays]

    async def start_replay(self, request: Any) -> Any:
        """A point-in-time replay inside this sidecar (POST /v1/replay); ReplayError if it cannot run."""
        from sidecar.replay.job import start_replay
        from sidecar.replay.request import ReplayError

        if self._services is None or self.ingress is None:
            raise ReplayError("the journal is not open yet", exit_code=1)
        job = await start_replay(self.config, self.ingress.journal, request, self._services)
        # Keep every running job and the last few finished ones, for GET /v1/drain.
        running = [j for j in self._replays if not j.finished]
        done = [j for j in self._replays if j.finished][-5:]
        self._replays = [*done, *running, job]
        return job

    def stop_replay(self, job_id: str) -> bool:
        for job in self._replays:
            if job.progress.id == job_id:
                job.stop()
                return True
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        log.info("starting", role=self.role, region=config.sidecar.region, namespaces=",".join(config.namespaces))
        async with trio.open_nursery() as outer:
            outer.start_soon(self._watch_signals)
            outer.start_soon(self._enforce_deadline, outer.cancel_scope)
            admin_stop = trio.Event()
            await outer.start(self._serve_admin, admin_stop)
            async with open_journal(config, connect_retry=self.connect_retry) as journal:
                await self._serve(journal, task_status)
            log.info("journal_closed")
            admin_stop.set()
            outer.cancel_scope.cancel()
        log.info("stopped")

    async def _serve(self, journal: Journal, task_status: Any) -> None:
        config = self.config
        conn = journal.writer.conn
        self.state.conn = conn
        self.state.writer = journal.writer
        self.ingress = Ingress(config, journal)
        self.pauses = Pauses(conn)
        await self.pauses.open()
        self.dead_letters = DeadLetters(conn, journal.writer)
        log.info("journal_ready", nats_url=conn.url, server_version=conn.server_version)
        # The control plane's namespaces (bucket over file) are in force before anything drains or listens.
        store = NamespaceStore(conn)
        await store.open()
        self.live = LiveNamespaces(config.namespaces, store, self._apply_namespace)
        await self.live.load()
        ingress_role = self.role in ("ingress", "all")
        if ingress_role:
            await subscribe_applied(conn, self.ingress.applied, list(config.namespaces))
        async with trio.open_nursery() as services:
            self._services = services
            services.start_soon(self.pauses.watch)
            services.start_soon(self.live.watch)
            services.start_soon(self.live.run)
            if self.role in ("drain", "all") and any(ns.targets for ns in config.namespaces.values()):
                self.drain = await services.start(DrainService(config, journal, pauses=self.pauses).run)
            self.poller = StatusPoller(config, conn, self.pauses, self.drain)
            services.start_soon(self.poller.run)
            async with trio.open_nursery() as listeners:
                if ingress_role:
                    for listener in config.listeners:
                        await listeners.start(self._serve_listener, listener)
                self.state.started = True
                task_status.started(self)
                # What is alive now (modules, drivers, config) lives until exit: moved out of the
                # cyclic GC's sight, every full collection scans only what traffic allocated since.
                # Startup's own garbage is collected first, so none of it is frozen for good.
                gc.collect()
                gc.freeze()
                log.info("ready")
                await self._shutdown.wait()
                await trio.sleep(config.sidecar.shutdown_grace)
                log.info("listeners_stopping")
                self._stop_listeners.set()
            log.info("listeners_stopped")
            await self._readers.close()
            for job in self._replays:
                job.stop()
            if self.drain is not None:
                await self.drain.stop(config.sidecar.shutdown_deadline)
            services.cancel_scope.cancel()

    async def _apply_namespace(self, name: str, ns: Namespace | None) -> None:
        """The control plane's change to one namespace, made live (LiveNamespaces calls it, one at a time)."""
        config = self.config
        old = config.namespaces.get(name)
        if ns is None:
            if self.drain is not None:
                await self.drain.reconcile(name, None)
            config.namespaces.pop(name, None)
            await self._readers.forget(name)
            log.info("namespace_removed", namespace=name)
            return
        stream = await self.live.store.stream_info(name) if self.live is not None else None
        problems = unsafe_changes(name, old, ns, stream)
        over = memory_budget.refusal(msgspec.structs.replace(config, namespaces={**config.namespaces, name: ns}),
                                     self.role)
        if over is not None:  # a namespace added live must fit the limit the process was started under
            problems.append(f"namespace {name} does not fit: {over}")
        if problems:
            raise ControlError("; ".join(problems))
        assert self.state.conn is not None
        await provision_namespace(self.state.conn, name, ns)
        config.namespaces[name] = ns
        if old is None and self.ingress is not None and self.role in ("ingress", "all"):
            await subscribe_applied(self.state.conn, self.ingress.applied, [name])
        await self._readers.forget(name)
        if self.drain is not None:
            await self.drain.reconcile(name, ns)
        elif self._services is not None and self.role in ("drain", "all") and ns.targets and self.ingress is not None:
            self.drain = await self._services.start(DrainService(config, self.ingress.journal, pauses=self.pauses).run)
            if self.poller is not None:
                self.poller.drain = self.drain
        log.info("namespace_applied", namespace=name, mode=ns.mode, targets=",".join(t.name for t in ns.targets),
                 source="new" if old is None else "changed")

    async def _enforce_deadline(self, scope: trio.CancelScope) -> None:
        """Whatever is still running at the deadline is cancelled: the process exits on time."""
        await self._shutdown.wait()
        scope.deadline = trio.current_time() + self.config.sidecar.shutdown_deadline
        await trio.sleep(self.config.sidecar.shutdown_deadline)
        log.warning("shutdown_deadline_reached", deadline=str(self.config.sidecar.shutdown_deadline))

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload_file()
                else:
                    self.request_shutdown(signal.Signals(signum).name)

    def _reload_file(self) -> None:
        """SIGHUP: the file's namespaces are applied live like a bucket change; the rest of the file
        (listeners, sidecar settings) takes a restart."""
        if self.config_path is None or self.live is None:
            log.warning("reload_ignored", reason="no config file or the journal is not open yet")
            return
        try:
            fresh = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            log.error("reload_failed", path=self.config_path, errors="; ".join(exc.errors))
            return
        log.info("reload", path=self.config_path, namespaces=",".join(fresh.namespaces))
        self.live.reload_file(fresh.namespaces)

    async def _serve_admin(self, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            # Admin and scrape connections never hold the shutdown open: one second, then they go.
            admin = hypercorn_config(self.config.sidecar.admin, graceful_timeout=1.0)
            with _naming_bind("admin", self.config.sidecar.admin):
                await nursery.start(serve_http, AdminApp(self, self._admin_token), admin, stop)
            log.info("admin_bound", bind=self.config.sidecar.admin)
            if self.config.sidecar.metrics:
                scrape = hypercorn_config(self.config.sidecar.metrics, graceful_timeout=1.0)
                with _naming_bind("metrics", self.config.sidecar.metrics):
                    await nursery.start(serve_http, AdminApp(self, metrics_only=True), scrape, stop)
                log.info("metrics_bound", bind=self.config.sidecar.metrics)
            task_status.started()

    async def _serve_listener(self, listener: Listener, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        name = _listener_name(listener)
        assert self.ingress is not None
        server: Callable[..., Awaitable[None]]  # each front's serve(*args, task_status=...)
        args: tuple[Any, ...]
        if listener.protocol == "kv":
            app = KvApp(self.ingress, self._readers, region_token=self._region_token,
                        token=_read_secret(listener.token_file), max_body=int(listener.max_body),
                        max_items=listener.max_items, body_budget=ByteBudget(int(listener.partial_budget)),
                        body_wait=float(listener.partial_wait), max_json_body=int(listener.max_json_body))
            http = hypercorn_config(listener.bind, graceful_timeout=self.config.sidecar.shutdown_deadline)
            http.alpn_protocols = list(KV_ALPN)  # before serve_tls builds the context: no h2 offered
            if listener.tls is not None:
                assert self._services is not None
                serve_tls(http, listener.tls.cert_file, listener.tls.key_file, float(listener.tls.reload_interval),
                          self._services, f"{_listener_name(listener)}.tls")
            server, args = serve_kv, (app, http, listener, self.config, self.ingress, self._stop_listeners)
        elif listener.protocol == "memcached":
            from sidecar.protocols.memcache.server import serve_memcached

            server, args = serve_memcached, (listener, self.ingress, self.config, self._stop_listeners)
        else:
            from sidecar.protocols.cql.server import serve_cql

            server, args = serve_cql, (listener, self.ingress, self.config, self._stop_listeners)
        async with trio.open_nursery() as nursery:
            with _naming_bind(f"{listener.protocol} listener", listener.bind):
                await nursery.start(server, *args)
            self.state.listeners_bound.add(name)
            log.info("listener_bound", protocol=listener.protocol, bind=listener.bind,
                     namespace=listener.namespace or "*")
            task_status.started()


@contextmanager
def _naming_bind(what: str, bind: str) -> Iterator[None]:
    """A bind failure says which address, not just "Address already in use"."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind the {what} to {bind}: {exc.strerror or exc}") from None
    except BaseExceptionGroup as group:
        leaf = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if isinstance(leaf, OSError):
            raise OSError(leaf.errno, f"cannot bind the {what} to {bind}: {leaf.strerror or leaf}") from None
        raise


def _listener_name(listener: Listener) -> str:
    return f"{listener.protocol}@{listener.bind}"


def _read_secret(path: str | None, create: bool = False) -> str | None:
    return read_token_file(path, create) if path else None


async def run_sidecar(config: Config, role: Role = "all") -> None:
    await Sidecar(config, role).run()
