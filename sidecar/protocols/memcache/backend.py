"""A trio-native pooled client to the real memcached behind the front.

Reads and conditional operations go to memcached synchronously; this is the pool
they share. Per server, up to `pool_size` connections, used round robin; requests
from many tasks are pipelined on one connection (one sender and one reader task
per connection, answers matched in order by `client_codec.ResponseParser`).

Failure handling is deliberately blunt, because a pipelined connection whose
answers no longer line up is worse than no connection: a timeout, a protocol
error or a closed socket fails the connection and every request waiting on it
(`BackendError`, with the reason); the next request reconnects. After a failed
connect the server is treated as down for `DOWN_RETRY` seconds, so a dead server
costs one connect attempt per interval instead of one per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from sidecar.config import MemcachedTarget
from sidecar.logs import get_logger
from sidecar.memcache_keys import server_for_key
from sidecar.units import parse_hostport

from .client_codec import BackendProtocolError, ResponseKind, ResponseParser
from .commands import NEED_DATA, Response

__all__ = ["DOWN_RETRY", "Backend", "BackendError"]

log = get_logger("memcached.backend")

DOWN_RETRY = 0.1  # seconds a server is failed fast after a connect error
_RECEIVE = 256 * 1024


class BackendError(Exception):
    """memcached gave no usable answer (down, timed out, out of sync); the message says why."""


class _Waiter:
    """One request: how many answers it expects, and those received so far."""

    __slots__ = ("deadline", "error", "event", "expected", "responses")

    def __init__(self, expected: int, deadline: float) -> None:
        self.expected = expected
        self.deadline = deadline
        self.responses: list[Response] = []
        self.event = trio.Event()
        self.error: str | None = None


class _Connection:
    def __init__(self, server: str, stream: trio.SocketStream, timeout: float) -> None:
        self.server = server
        self.stream = stream
        self.timeout = timeout
        self.parser = ResponseParser()
        self.waiters: deque[_Waiter] = deque()
        self.out = bytearray()
        self.wake = trio.Event()
        self.error: str | None = None
        self.sending = False  # a send_all is in progress (sender task or a requester)
        self.scope = trio.CancelScope()

    async def send(self, payload: bytes, kinds: Sequence[ResponseKind]) -> _Waiter:
        """Send a request; its answers are expected in exactly the order requests are registered here.

        When nothing is being sent the caller writes to the socket itself (lowest latency, one
        task switch less); otherwise the bytes queue for the sender task, which sends everything
        queued meanwhile with one syscall."""
        if self.error is not None:
            raise BackendError(self.error)
        waiter = _Waiter(len(kinds), trio.current_time() + self.timeout)
        busy = self.sending or bool(self.out)
        if not kinds:
            waiter.event.set()
        else:
            for kind in kinds:
                self.parser.expect(kind)
            self.waiters.append(waiter)
        if busy:
            self.out += payload
            self.wake.set()
            return waiter
        self.sending = True
        try:
            await self.stream.send_all(payload)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(f"memcached {self.server} connection lost: {exc or type(exc).__name__}")
            raise BackendError(self.error or "connection lost") from None
        except BaseException:
            # Cancelled mid-write (a timeout): the request may be half sent, the stream is out of sync.
            self.fail(f"memcached {self.server}: a request was cut off while being sent")
            raise
        finally:
            self.sending = False
            if self.out:
                self.wake.set()
        return waiter

    def fail(self, reason: str, closing: bool = False) -> None:
        if self.error is not None:
            return
        self.error = reason
        if closing:
            log.debug("backend_connection_closed", server=self.server)
        else:
            log.warning("backend_connection_failed", server=self.server, reason=reason)
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.error = reason
            waiter.event.set()
        self.scope.cancel()

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._send_loop)
                nursery.start_soon(self._watchdog)
                await self._guarded(self._receive_loop)
                nursery.cancel_scope.cancel()
        self.fail(self.error or f"memcached {self.server} connection closed")
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop; any error fails the connection (and with it every waiting request)."""
        try:
            await loop()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.fail(f"memcached {self.server} connection lost: {exc or type(exc).__name__}")
        except BackendProtocolError as exc:
            self.fail(f"memcached {self.server} answered out of protocol: {exc}")
        except Exception as exc:  # a bug here must fail the requests, never hang them
            log.error("backend_connection_bug", server=self.server, exc_info=True)
            self.fail(f"memcached {self.server} client error: {type(exc).__name__}: {exc}")

    async def _watchdog(self) -> None:
        """Fail the connection when its oldest request is over its deadline.

        One timer per connection instead of a cancel scope per request (those cost more than
        the request itself); a timeout is therefore noticed within a quarter of it."""
        interval = max(self.timeout / 4, 0.005)
        while True:
            await trio.sleep(interval)
            if self.waiters and trio.current_time() > self.waiters[0].deadline:
                self.fail(f"memcached {self.server} did not answer within {self.timeout:g}s")
                return

    async def _send_loop(self) -> None:
        while True:
            if self.out and not self.sending:
                data = bytes(self.out)
                self.out.clear()
                self.sending = True
                try:
                    await self.stream.send_all(data)
                finally:
                    self.sending = False
            else:
                await self.wake.wait()
                self.wake = trio.Event()

    async def _receive_loop(self) -> None:
        parser = self.parser
        waiters = self.waiters
        while True:
            data = await self.stream.receive_some(_RECEIVE)
            if not data:
                self.fail(f"memcached {self.server} closed the connection")
                return
            parser.feed(data)
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                waiter = waiters[0]
                waiter.responses.append(event)  # type: ignore[arg-type]
                if len(waiter.responses) == waiter.expected:
                    waiters.popleft()
                    waiter.event.set()


class _Pool:
    def __init__(self, server: str, size: int) -> None:
        self.server = server
        self.host, self.port = parse_hostport(server)
        self.slots: list[_Connection | None] = [None] * max(1, size)
        self.locks = [trio.Lock() for _ in self.slots]
        self.next = 0
        self.down_until = 0.0
        self.down_reason = ""


class Backend:
    """Pooled, pipelined requests to the servers of one memcached target.

    Connection tasks run in `nursery`; cancel it (after `close`) to stop them.
    """

    def __init__(self, target: MemcachedTarget, nursery: trio.Nursery) -> None:
        self.target = target
        self.servers: list[str] = list(target.servers)
        self.timeout = float(target.timeout)
        self._nursery = nursery
        self._pools = {server: _Pool(server, target.pool_size) for server in self.servers}
        self._closed = False

    def server_for(self, key: bytes) -> str:
        """The server owning a raw memcached key (same choice as the drain's)."""
        return server_for_key(self.servers, key)

    async def request(self, server: str, payload: bytes, kinds: Sequence[ResponseKind]) -> list[Response]:
        """Send `payload` (one or more requests) to `server`; one answer per entry of `kinds`, in order.

        Raises BackendError when memcached is unreachable, closes the connection, answers out of
        protocol, or does not answer within the target's timeout (see `_Connection._watchdog`)."""
        connection = await self._connection(server)
        waiter = await connection.send(payload, kinds)
        await waiter.event.wait()
        if waiter.error is not None:
            raise BackendError(waiter.error)
        return waiter.responses

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for connection in pool.slots:
                if connection is not None:
                    connection.fail("the sidecar is shutting down", closing=True)

    async def _connection(self, server: str) -> _Connection:
        if self._closed:
            raise BackendError("the sidecar is shutting down")
        pool = self._pools.get(server)
        if pool is None:
            raise BackendError(f"{server} is not a server of target {self.target.name}")
        index = pool.next
        pool.next = (index + 1) % len(pool.slots)
        connection = pool.slots[index]
        if connection is not None and connection.error is None:
            return connection
        async with pool.locks[index]:
            connection = pool.slots[index]
            if connection is not None and connection.error is None:
                return connection
            connection = await self._connect(pool)
            pool.slots[index] = connection
            return connection

    async def _connect(self, pool: _Pool) -> _Connection:
        if trio.current_time() < pool.down_until:
            raise BackendError(pool.down_reason)
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(pool.host, pool.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"memcached {pool.server} unreachable: {exc or 'connect timed out'}"
            pool.down_until = trio.current_time() + DOWN_RETRY
            pool.down_reason = reason
            log.warning("backend_connect_failed", server=pool.server, reason=reason)
            raise BackendError(reason) from None
        connection = _Connection(pool.server, stream, self.timeout)
        self._nursery.start_soon(connection.run)
        return connection
