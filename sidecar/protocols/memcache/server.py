"""The memcached listener: a thin trio loop around `codec.RequestParser` and `handlers.Handlers`.

Per connection, commands are taken in order and answered in order (pipelining
works), but they need not run one at a time:

* unconditional writes in a row are journaled concurrently — that is where the
  throughput comes from — yet handed to the journal in arrival order (each waits
  until the one before it is queued in the journal writer), and answered in order;
* reads run alongside them;
* anything that must see what came before it (conditional writes, gat, stats,
  flush_all) waits until every earlier command of the connection finished, and
  the connection reads nothing more until it is done (memcached's own order).

A noreply write still holds its place in the answer order: nothing after it is
answered before it is journaled (or failed).

A new connection starts on the listener's multiplexer (mux.py), which serves the common
case — unconditional writes and local commands — for all connections from one task; the
first command it does not serve hands the connection to its own task (`Connection.serve`,
below) for the rest of its life.
"""

from __future__ import annotations

import socket
from typing import Any, Final

import trio

from sidecar.config import Config, Listener
from sidecar.ingress import Ingress
from sidecar.logs import get_logger
from sidecar.tcp import ByteBudget, ConnectionGate, IdleWatch, accept_forever, cap_connections
from sidecar.units import parse_hostport

from .backend import Backend
from .codec import OUT_OF_MEMORY, RequestParser
from .commands import NEED_DATA, Command, ProtocolError, ServerError
from .handlers import Handlers, JournalJob, Kind, memcached_target
from .mux import Multiplexer
from .mux import enabled as mux_enabled
from .responses import LARGE_VALUE, RECEIVE, Responses, Slot
from .stats import FrontStats

__all__ = ["MemcacheServer", "serve_memcached"]

log = get_logger("memcached")

LINGER: Final = 1.0  # seconds to wait for the client to close after we half-closed
TOO_MANY: Final = b"ERROR Too many open connections\r\n"  # memcached's words at its -c limit


class Connection:
    def __init__(self, server: MemcacheServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.handlers = server.handlers
        self.stream = stream
        self.responses = Responses()
        # Like memcached, accept control characters in keys (memaslap sends them); the journal
        # stores such keys as b64:<base64>.
        self.parser = RequestParser(max_item_size=server.max_item_size, control_chars_in_keys=True)
        self.outstanding = 0
        self.writes_outstanding = 0  # journal writes in flight (a read behind them may need their ack)
        self.settled = trio.Event()  # set when outstanding drops to 0
        self.last_gate: trio.Event | None = None  # set once the latest journal write is queued
        self.stopping = False
        self.client_gone = False  # the client closed its side (or the connection broke)
        self.reserved = 0  # bytes of the listener's partial budget this connection holds
        self.idle = IdleWatch(server.idle_timeout, self._idle)
        self._nursery: trio.Nursery | None = None
        # While the listener's multiplexer serves the connection (mux.py): set when it hands over.
        self.handed_over: trio.Event | None = None
        self.resume_with: Command | ProtocolError | None = None  # the command it handed over at
        self.flush_queued = False

    async def _watch_idle(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.idle.run()

    def _idle(self) -> None:
        self.server.gate.idle_closed += 1
        log.info("connection_idle_closed", idle_timeout=self.server.idle_timeout)
        self.stop()

    def stop(self) -> None:
        """Read no more commands; answer those already read, then close.

        Shutting the socket's read side ends a pending receive with EOF (no cancel scope
        around every receive: that is per-command cost)."""
        self.stopping = True
        try:
            self.stream.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    async def serve(self, resumed: bool = False) -> None:
        """Read, answer, close; `resumed`: the multiplexer read the first part (the parser holds
        what it did not take yet, `resume_with` the command it stopped at)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_loop, nursery.cancel_scope)
                idle_scope = trio.CancelScope()
                if self.idle.timeout > 0:
                    nursery.start_soon(self._watch_idle, idle_scope)
                await self._read_loop(resumed)
                idle_scope.cancel()
                self.responses.close()
            if self.responses.closing and not self.client_gone and not self.stopping:
                await self._linger()
        finally:
            self.server.budget.release(self.reserved)
            self.reserved = 0
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _linger(self) -> None:
        """We close (quit, fatal error) with the client possibly still sending: half-close and discard
        its input for a moment, so the kernel does not reset the connection and lose our last answer."""
        with trio.move_on_after(LINGER):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(RECEIVE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # ------------------------------------------------------------------ reading

    async def _read_loop(self, resumed: bool = False) -> None:
        parser = self.parser
        responses = self.responses
        receive_some = self.stream.receive_some
        while not self.stopping:
            if resumed:
                resumed = False
                pending, self.resume_with = self.resume_with, None
                if pending is not None and not await self._dispatch(pending):
                    return
            else:
                try:
                    data = await receive_some(RECEIVE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    self.client_gone = not self.stopping
                    return
                self.idle.touch()
                parser.feed(data)
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    if not self.reserved and (parser.pending_length >= LARGE_VALUE
                                              or parser.partial_line_length >= LARGE_VALUE):
                        event = await self._reserve()  # type: ignore[assignment]  # None or the refusal to answer
                        if event is None:
                            break
                    else:
                        break
                elif self.reserved:  # the value it was held for is complete (or refused)
                    self.server.budget.release(self.reserved)
                    self.reserved = 0
                if not await self._dispatch(event):  # type: ignore[arg-type]
                    return
                if responses.full:
                    await self._wait_for_space()

    async def _reserve(self) -> ProtocolError | None:
        """Room in the listener's budget for the data block being received (or a long multi-key get
        line, up to its limit), before reading on; None once reserved, else the refusal: the data
        block is discarded (the connection goes on), a line closes the connection."""
        server = self.server
        parser = self.parser
        length = parser.pending_length or parser.max_partial_line
        self.reserved = await server.budget.acquire(length, server.partial_wait)
        if self.reserved:
            return None
        log.warning("partial_budget_exhausted", length=length, budget=server.budget.limit,
                    refused=server.budget.refused)
        if parser.pending_length:
            return parser.refuse_pending()
        return ServerError(OUT_OF_MEMORY, fatal=True)

    async def _wait_for_space(self) -> None:
        responses = self.responses
        while responses.full and not responses.closing:
            responses.space = trio.Event()
            await responses.space.wait()

    async def _dispatch(self, event: Command | ProtocolError) -> bool:
        """Handle one event; False when the connection must close after the answers owed."""
        if isinstance(event, ProtocolError):
            if not await self._reply(event.response):
                return False
            if event.fatal:
                self.responses.close()
                return False
            return True
        handlers = self.handlers
        kind = handlers.classify(event)
        inline = not self.outstanding and self.parser.idle
        if kind is Kind.JOURNAL and handlers.wal_off():
            await self._settle()  # what was read before it is answered (and sent) first
            if await handlers.direct(event):
                return await self._reply(await handlers.forward(event))
        if kind is Kind.JOURNAL:
            job = handlers.journal_job(event)
            if type(job) is bytes:
                return await self._reply(job)
            if inline:
                # Nothing else in flight or read: no task, no ordering gate needed.
                self.last_gate = None
                return await self._reply(await handlers.journal(job))  # type: ignore[arg-type]
            self._journal(job)  # type: ignore[arg-type]
            return True
        if kind is Kind.READ:
            if self.writes_outstanding and handlers.reads_own_writes():
                # Read your own writes on a pipeline too (a noreply set, then a get, in one packet):
                # the writes before this read are acked, and overlaid, before it runs.
                await self._settle()
                inline = self.parser.idle
            if inline:
                return await self._reply(await handlers.read(event))
            self._spawn(self._read, self.responses.reserve(), event)
            return True
        if kind is Kind.SYNC:
            await self._settle()
            return await self._reply(await handlers.sync(event))
        if kind is Kind.LOCAL:
            return await self._reply(handlers.local(event))
        self.responses.close()  # quit
        return False

    # ------------------------------------------------------------------ concurrent work

    def _spawn(self, fn: Any, *args: Any) -> None:
        self.outstanding += 1
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def finished(self) -> None:
        """One outstanding command has its answer."""
        self.outstanding -= 1
        if not self.outstanding:
            self.settled.set()

    async def _settle(self) -> None:
        """Wait until every command read before now has finished."""
        while self.outstanding:
            self.settled = trio.Event()
            await self.settled.wait()

    def _journal(self, job: JournalJob) -> None:
        slot = self.responses.reserve()
        gate = self.last_gate
        if gate is not None and gate.is_set():
            gate = None
        mine = trio.Event()
        self.last_gate = mine
        self.writes_outstanding += 1
        self._spawn(self._journal_task, slot, job, gate, mine)

    async def _journal_task(self, slot: Slot, job: JournalJob, gate: trio.Event | None, mine: trio.Event) -> None:
        data = b""
        try:
            if gate is not None:
                await gate.wait()
            if not job.hold:
                # The journal queues the entry before its first checkpoint, so the next write
                # (woken by this) cannot overtake it. A held one (chunked) releases after its ack.
                mine.set()
            data = await self.handlers.journal(job)
        finally:
            mine.set()
            self.writes_outstanding -= 1
            self.responses.fill(slot, data)
            self.finished()

    async def _read(self, slot: Slot, event: Command) -> None:
        data = b""
        try:
            data = await self.handlers.read(event)
        finally:
            self.responses.fill(slot, data)
            self.finished()

    # ------------------------------------------------------------------ writing

    async def _reply(self, data: bytes) -> bool:
        """An answer the reader has now: sent at once when nothing is owed or being sent before it
        (the common one-request-at-a-time case: no hand-off to the sender task), else queued.
        False when the client is gone."""
        responses = self.responses
        if responses.slots or responses.out or responses.sending:
            responses.answer(data)
            return True
        if not data:
            return True
        responses.sending = True
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.client_gone = True
            return False
        finally:
            responses.sending = False
            if responses.out or responses.closing:
                responses.wake.set()
        return True

    async def _send_loop(self, scope: trio.CancelScope) -> None:
        responses = self.responses
        stream = self.stream
        try:
            while True:
                if responses.out and not responses.sending:
                    responses.sending = True
                    try:
                        await stream.send_all(responses.take())
                    finally:
                        responses.sending = False
                    responses.freed()
                elif responses.closing and not responses.out and not responses.sending:
                    scope.cancel()
                    return
                else:
                    await responses.wake.wait()
                    responses.wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.client_gone = True
            # The client is gone: stop everything. Journal writes already queued still
            # complete in the journal writer; only their answers are dropped.
            scope.cancel()


class MemcacheServer:
    """One memcached listener: its connections, their handlers, and graceful stop."""

    def __init__(self, handlers: Handlers, max_item_size: int, budget: ByteBudget | None = None,
                 partial_wait: float = 2.0, idle_timeout: float = 0.0, gate: ConnectionGate | None = None) -> None:
        self.handlers = handlers
        self.max_item_size = max_item_size
        self.budget = budget or ByteBudget(32 * 1024 * 1024)
        self.partial_wait = partial_wait
        self.idle_timeout = idle_timeout
        self.gate = gate or ConnectionGate("memcached", "", 1 << 30, TOO_MANY)
        self.connections: set[Connection] = set()
        self.mux: Multiplexer | None = None  # serves connections until they need their own task

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        await accept_forever(listener, self.handle, nursery, "memcached", self.gate)

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = Connection(self, stream)
        stats = self.handlers.stats
        stats.curr_connections += 1
        stats.total_connections += 1
        self.connections.add(connection)
        try:
            if self.mux is not None and self.idle_timeout <= 0:
                await self.mux.adopt(connection)
                await connection.serve(resumed=True)
            else:
                await connection.serve()
        except Exception:  # a bug in one connection must not take the listener down
            log.error("connection_failed", exc_info=True)
        finally:
            self.connections.discard(connection)
            stats.curr_connections -= 1

    def stop_connections(self) -> None:
        if self.mux is not None:
            self.mux.hand_over_all()
        for connection in list(self.connections):
            connection.stop()


async def serve_memcached(
    listener: Listener,
    ingress: Ingress,
    config: Config,
    stop: trio.Event,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one memcached listener until `stop` is set, then finish in-flight commands and close.

    In-flight commands get at most `sidecar.shutdown_deadline` seconds after `stop`.
    """
    if listener.namespace is None:
        raise ValueError(f"memcached listener {listener.bind} needs a namespace")
    ns = ingress.namespace(listener.namespace)
    target = memcached_target(ns)
    host, port = parse_hostport(listener.bind)
    sockets = await trio.open_tcp_listeners(port, host=host)
    stats = FrontStats()
    try:
        async with trio.open_nursery() as backend_nursery:
            backend = Backend(target, backend_nursery) if target is not None else None
            handlers = Handlers(ingress, listener.namespace, backend, stats)
            budget = ByteBudget(int(listener.partial_budget))
            gate = ConnectionGate("memcached", listener.bind, cap_connections(listener, config), TOO_MANY, budget)
            ingress.connection_gates[listener.bind] = gate
            server = MemcacheServer(handlers, ns.item_limit(), budget, listener.partial_wait, listener.idle_timeout,
                                    gate)
            if mux_enabled():
                server.mux = Multiplexer()
                backend_nursery.start_soon(server.mux.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for sock in sockets:
                        accepting.start_soon(server.accept_loop, sock, connections)
                    log.info("memcached_listening", bind=listener.bind, namespace=listener.namespace,
                             target=target.name if target else "", servers=",".join(target.servers) if target else "")
                    task_status.started()
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                for sock in sockets:
                    await sock.aclose()
                log.info("memcached_stopping", bind=listener.bind, connections=len(server.connections))
                server.stop_connections()
                connections.cancel_scope.deadline = trio.current_time() + config.sidecar.shutdown_deadline
            if backend is not None:
                backend.close()
            backend_nursery.cancel_scope.cancel()
    finally:
        for sock in sockets:
            with trio.CancelScope(shield=True):
                await sock.aclose()
    log.info("memcached_stopped", bind=listener.bind)
