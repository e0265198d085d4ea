"""The CQL listener: a thin trio server around :class:`~.proxy.CqlProxy`.

Per app connection one reader task feeds bytes to the codec and the proxy, and
one writer task drains the replies (coalesced into one ``send_all``).  A reader
stops reading while its connection has a large backlog of unsent replies, so a
slow app cannot make the sidecar buffer without bound.

Shutdown (``stop`` set): stop accepting, stop reading new requests, answer the
ones already taken (bounded by ``shutdown_deadline``), flush, close.
"""

from __future__ import annotations

from typing import Any, Final

import trio

from sidecar.config import Config, Listener
from sidecar.ingress import Ingress
from sidecar.logs import get_logger
from sidecar.tcp import ByteBudget, ConnectionGate, IdleWatch, accept_forever, cap_connections
from sidecar.units import parse_hostport

from .frames import Frame, UnsupportedVersion
from .messages import Error, ErrorCode
from .proxy import CqlProxy
from .session import Client
from .types import CqlProtocolError

__all__ = ["serve_cql"]

log = get_logger("cql")

RECEIVE_SIZE: Final = 65536
# Frames dispatched before the reader yields: a driver pipelines dozens of requests per
# read, and handing them all to the journal at once returns all their answers at once, so
# the driver and walcar take turns idling; slices keep both busy (~+20% inserts/s).
DISPATCH_SLICE: Final = 8
HIGH_WATER: Final = 4 * 1024 * 1024  # unsent reply bytes before the reader pauses
# A frame at least this long is received only with room in the listener's partial_budget.
LARGE_FRAME: Final = 64 * 1024


class _Limits:
    """What one listener bounds for all its connections."""

    def __init__(self, listener: Listener, config: Config, ingress: Ingress) -> None:
        self.max_frame = int(listener.max_frame_size)
        self.preauth_frame = int(listener.preauth_frame_size)
        self.budget = ByteBudget(int(listener.partial_budget))
        self.partial_wait = float(listener.partial_wait)
        self.idle_timeout = float(listener.idle_timeout)
        self.gate = ConnectionGate("cql", listener.bind, cap_connections(listener, config), budget=self.budget)
        ingress.connection_gates[listener.bind] = self.gate


class _Connection:
    """The socket side of one app connection."""

    def __init__(self, stream: trio.SocketStream, proxy: CqlProxy, limits: _Limits) -> None:
        self.stream = stream
        self.proxy = proxy
        self.limits = limits
        self.reserved = 0  # bytes of the listener's partial budget held for the frame arriving
        self.idle = IdleWatch(limits.idle_timeout, self._idle)
        self.out = bytearray()
        self._wake = trio.Event()
        self._written = trio.Event()
        self.read_scope = trio.CancelScope()
        self.done = False
        sock = stream.socket
        local = sock.getsockname()
        try:
            peer = sock.getpeername()
            self.peer = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.peer = "?"
        self.local = (local[0], local[1])

    def send(self, data: bytes) -> None:
        self.out += data
        if not self._wake.is_set():
            self._wake.set()

    async def serve(self, deadline: float) -> None:
        proxy = self.proxy
        try:
            async with trio.open_nursery() as nursery:
                client = Client(self.send, nursery, proxy.local_node(*self.local), self.peer,
                                self.limits.max_frame, self.limits.preauth_frame)
                proxy.clients.add(client)
                try:
                    nursery.start_soon(self._write_loop)
                    if self.idle.timeout > 0:
                        nursery.start_soon(self.idle.run)
                    with self.read_scope:
                        await self._read_loop(client)
                    # Answer what was already asked, then flush and close.
                    with trio.move_on_after(deadline):
                        # Polled, on this shutdown path only: `inflight` is counted down in five places.
                        while client.inflight > 0:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                        await self._flush()
                finally:
                    client.closed = True
                    proxy.clients.discard(client)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the app went away; its pending answers have nowhere to go
        finally:
            self.limits.budget.release(self.reserved)
            self.reserved = 0
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _idle(self) -> None:
        self.limits.gate.idle_closed += 1
        log.info("connection_idle_closed", peer=self.peer, idle_timeout=self.limits.idle_timeout)
        self.read_scope.cancel()

    async def _reserve(self, client: Client) -> bool:
        """Room in the listener's budget for the frame arriving, before reading it; False (the app
        told Overloaded, the connection to close) when none came within partial_wait."""
        limits = self.limits
        self.reserved = await limits.budget.acquire(client.decoder.pending_length, limits.partial_wait)
        if self.reserved:
            return True
        log.warning("partial_budget_exhausted", peer=self.peer, length=client.decoder.pending_length,
                    budget=limits.budget.limit, refused=limits.budget.refused)
        client.respond(0, Error(ErrorCode.OVERLOADED, "walcar: too many large requests arriving at once"))
        return False

    async def _flush(self) -> None:
        while self.out:
            self._written = trio.Event()
            await self._written.wait()

    async def _read_loop(self, client: Client) -> None:
        decoder = client.decoder
        while True:
            while len(self.out) > HIGH_WATER:
                self._written = trio.Event()
                await self._written.wait()
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            self.idle.touch()
            decoder.feed(data)
            dispatched = 0
            while True:
                try:
                    event = decoder.next_event()
                except CqlProtocolError as exc:
                    client.respond(exc.stream or 0, Error(exc.code, exc.message))
                    if exc.fatal:
                        return
                    continue
                if self.reserved and not decoder.pending_length:  # its frame is complete
                    self.limits.budget.release(self.reserved)
                    self.reserved = 0
                if event is None:
                    if decoder.pending_length >= LARGE_FRAME and not self.reserved and not await self._reserve(client):
                        return
                    break
                if isinstance(event, UnsupportedVersion):
                    self.send(event.reply())  # the driver retries with v4 on a new connection
                    return
                self._dispatch(client, event)
                dispatched += 1
                if dispatched % DISPATCH_SLICE == 0:
                    await trio.lowlevel.checkpoint()

    def _dispatch(self, client: Client, frame: Frame) -> None:
        try:
            self.proxy.handle(client, frame)
        except CqlProtocolError as exc:
            client.respond(frame.stream, Error(exc.code, exc.message))
        except Exception as exc:  # a bug must cost one request, not the connection or the server
            log.error("cql_dispatch_failed", exc_info=True, peer=self.peer, opcode=frame.opcode)
            client.respond(frame.stream, Error.server_error(f"walcar internal error: {exc}"))

    async def _write_loop(self) -> None:
        while True:
            if not self.out:
                self._written.set()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            data, self.out = self.out, bytearray()
            await self.stream.send_all(data)
            self._written.set()


async def _accept_loop(
    listener: trio.SocketListener, nursery: trio.Nursery, proxy: CqlProxy, connections: set[_Connection],
    deadline: float, limits: _Limits,
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        conn = _Connection(stream, proxy, limits)
        connections.add(conn)
        await _serve_connection(conn, connections, deadline)

    async with listener:
        await accept_forever(listener, handle, nursery, "cql", limits.gate)


async def _serve_connection(conn: _Connection, connections: set[_Connection], deadline: float) -> None:
    try:
        await conn.serve(deadline)
    finally:
        connections.discard(conn)


async def serve_cql(
    listener: Listener,
    ingress: Ingress,
    config: Config,
    stop: trio.Event,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one CQL listener until ``stop`` is set, then drain its connections and return."""
    host, port = parse_hostport(listener.bind)
    proxy = CqlProxy(listener, ingress, config)
    limits = _Limits(listener, config, ingress)
    deadline = float(config.sidecar.shutdown_deadline)
    sockets = await trio.open_tcp_listeners(port, host=host)
    connections: set[_Connection] = set()
    async with trio.open_nursery() as outer:
        await outer.start(proxy.upstream.run)
        async with trio.open_nursery() as conns:
            accept_scope = trio.CancelScope()

            async def accept_all() -> None:
                with accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for sock in sockets:
                            acceptors.start_soon(_accept_loop, sock, conns, proxy, connections, deadline, limits)

            conns.start_soon(accept_all)
            log.info("cql_listening", bind=listener.bind, namespace=listener.namespace,
                     upstream=",".join(f"{h}:{p}" for h, p in proxy.upstream.contact_points))
            task_status.started()
            await stop.wait()
            accept_scope.cancel()
            log.info("cql_stopping", bind=listener.bind, connections=len(connections))
            for conn in list(connections):
                conn.read_scope.cancel()
            conns.cancel_scope.deadline = trio.current_time() + deadline + 1.0
        outer.cancel_scope.cancel()
    log.info("cql_stopped", bind=listener.bind)
