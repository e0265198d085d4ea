"""One task per memcached listener reading every client socket that has data.

A/B'd against one task per connection in `bench/memcached/run.py --ab-mux` (docs/benchmarks.md):
~16-22% less CPU per set. `WALCAR_MEMCACHED_IO=tasks` switches it off (the A/B's baseline).
A listener with an `idle_timeout` keeps one task per connection (the idle watch is per task).

The default front gives each connection its own reader task: per request a trio wake-up, a recv that
finds nothing, a re-registration with trio's epoll, a recv and a send. Here the listener keeps its
client sockets in an epoll set of its own, registered once (level-triggered); trio waits on that
set's descriptor, and one step reads every socket it reports, parses, and hands unconditional writes
to the journal with `Ingress.write_then` (no task per write). Answers fill the connection's ordered
`Responses`; a second task sends whatever became ready in one pass over the connections (one wake-up
per batch of PubAcks, not per write).

Only the common case is served here: unconditional writes (set/delete/touch, meta set/delete) that
can be journaled without a task, and local commands. Anything else — a read, a conditional or sync
command, a protocol error, a value large enough for the partial budget, a write the journal cannot
take without waiting, a full answer queue or a bulk pipeline, a send that would block, end of input,
the listener stopping — hands the connection over to its own task for good (`Connection.serve`, resuming with
the parser's buffered input and the command that needed it), so every ordering and bounding rule of
that path applies unchanged; writes journaled here before the hand-over count as the connection's
outstanding writes, so a read after them still waits for their acks.
"""

from __future__ import annotations

import os
import select
from typing import TYPE_CHECKING, Final

import trio

from sidecar.ingress import Ack
from sidecar.logs import get_logger

from .commands import NEED_DATA, Command, ProtocolError
from .handlers import Kind
from .responses import LARGE_VALUE, RECEIVE

if TYPE_CHECKING:
    from .server import Connection

log = get_logger("memcached")

POLL_EVENTS: Final = 256  # sockets taken per step; the rest stay readable for the next
# A client with this many writes in flight is a bulk pipeline (a noreply flood): its own task reads it,
# at the pace its writes are admitted, instead of this loop pulling its whole stream into the journal.
PIPELINE_WRITES: Final = 64


def enabled() -> bool:
    return os.environ.get("WALCAR_MEMCACHED_IO", "") != "tasks"


class Multiplexer:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._connections: dict[int, Connection] = {}
        self._dirty: list[Connection] = []
        self._flush_needed = trio.Event()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._flush_loop)
        finally:
            self.hand_over_all()
            self._epoll.close()

    async def adopt(self, connection: Connection) -> None:
        """Serve `connection` here until it needs its own task (then `connection.resume_with` is the
        command it stopped at, if any)."""
        fd = connection.stream.socket.fileno()
        connection.handed_over = trio.Event()
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError):  # the multiplexer has stopped: the connection's own task serves it
            connection.handed_over.set()
            return
        connection.responses.notify = lambda: self._mark(connection)
        self._connections[fd] = connection
        try:
            await connection.handed_over.wait()
        finally:  # cancelled (the listener's shutdown deadline): forget the socket before it closes
            self.hand_over(connection, connection.resume_with)

    def hand_over(self, connection: Connection, event: Command | ProtocolError | None) -> None:
        """From now on the connection's own task reads, answers and closes it."""
        if connection.handed_over is None or connection.handed_over.is_set():
            return
        fd = connection.stream.socket.fileno()
        if self._connections.get(fd) is connection:
            del self._connections[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        connection.responses.notify = None
        connection.resume_with = event
        connection.handed_over.set()

    def hand_over_all(self) -> None:
        """The listener stops: each connection finishes (answers owed, then close) on its own task."""
        for connection in list(self._connections.values()):
            self.hand_over(connection, None)

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        epoll = self._epoll
        connections = self._connections
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0, POLL_EVENTS):
                connection = connections.get(fd)
                if connection is None:
                    continue
                try:
                    data = os.read(fd, RECEIVE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # end of input or an error: the connection's task sees it again and finishes
                    self.hand_over(connection, None)
                    continue
                try:
                    self._feed(connection, data)
                except Exception:  # a bug in one connection must not stop the listener
                    log.error("connection_failed", exc_info=True)
                    self.hand_over(connection, None)

    def _feed(self, connection: Connection, data: bytes) -> None:
        parser = connection.parser
        parser.feed(data)
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                if parser.pending_length >= LARGE_VALUE or parser.partial_line_length >= LARGE_VALUE:
                    self.hand_over(connection, None)
                return
            if not self._serve(connection, event):  # type: ignore[arg-type]
                self.hand_over(connection, event)  # type: ignore[arg-type]
                return
            if connection.responses.full or connection.writes_outstanding >= PIPELINE_WRITES:
                self.hand_over(connection, None)
                return

    def _serve(self, connection: Connection, event: Command | ProtocolError) -> bool:
        """Answer `event` here; False when it needs the connection's own task (nothing done then)."""
        if isinstance(event, ProtocolError):
            return False
        handlers = connection.handlers
        kind = handlers.classify(event)
        if kind is Kind.LOCAL:
            connection.responses.answer(handlers.local(event))
            return True
        if kind is not Kind.JOURNAL or handlers.wal_off():
            return False
        job = handlers.journal_job(event)
        if type(job) is bytes:
            connection.responses.answer(job)
            return True
        if job.hold:  # type: ignore[union-attr]
            return False
        responses = connection.responses
        slot = responses.reserve()
        connection.outstanding += 1
        connection.writes_outstanding += 1

        def journaled(ack: Ack) -> None:
            connection.writes_outstanding -= 1
            responses.fill(slot, handlers.journal_answer(job, ack))  # type: ignore[arg-type]
            connection.finished()

        if handlers.ingress.write_then(job.entry, "memcached", journaled, packable=True):  # type: ignore[union-attr]
            return True
        responses.slots.pop()  # the write was not taken: the connection's task does it again
        connection.outstanding -= 1
        connection.writes_outstanding -= 1
        return False

    # ------------------------------------------------------------------ writing

    def _mark(self, connection: Connection) -> None:
        if not connection.flush_queued:
            connection.flush_queued = True
            self._dirty.append(connection)
            self._flush_needed.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_needed.wait()
            self._flush_needed = trio.Event()
            dirty, self._dirty = self._dirty, []
            for connection in dirty:
                connection.flush_queued = False
                if connection.handed_over is None or connection.handed_over.is_set():
                    continue  # its own task sends now
                data = connection.responses.take()
                if not data:
                    continue
                try:
                    sent = os.write(connection.stream.socket.fileno(), data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = 0  # the client is gone: its task finds out and finishes
                if sent < len(data):
                    rest = data[sent:]
                    connection.responses.out.append(rest)
                    connection.responses.out_bytes += len(rest)
                    self.hand_over(connection, None)
