"""Accepting TCP connections for the protocol servers (memcached, CQL, KV), and what bounds them.

* `ConnectionGate`: a listener's connection cap. At the cap a new connection is accepted and
  closed at once (with the protocol's refusal line, if it has one) instead of left in the
  kernel's backlog, so clients fail fast and descriptors stay free for the admin listener
  and the probes. The cap is clamped to what the process's descriptor limit leaves after a
  reserve (`fd_share`).
* `ByteBudget`: bytes a listener's connections may hold in partly received requests.
* `IdleWatch`: closes a connection that sent nothing for `idle_timeout`, without a cancel
  scope around every receive (one timer task per connection, woken rarely).
"""

from __future__ import annotations

import errno
import resource
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from sidecar.config import Config, Listener
from sidecar.logs import get_logger

log = get_logger("tcp")

# Out of descriptors or memory: the listener is fine, the moment is not. Wait and go on.
_TRANSIENT: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Descriptors kept out of every front's reach: NATS, the admin and metrics listeners and the
# probes' connections to them, target pools, chunk-store work, log files.
FD_RESERVE: Final = 128


def fd_share(listeners: int) -> int:
    """Connections each of `listeners` capped listeners may hold within the descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (soft - FD_RESERVE) // max(1, listeners))


def cap_connections(listener: Listener, config: Config) -> int:
    """A listener's max_connections, within its share of the process's descriptors."""
    capped = len(config.listeners)
    cap = min(listener.max_connections, fd_share(capped))
    if cap < listener.max_connections:
        log.warning("connection_cap_clamped", bind=listener.bind, max_connections=listener.max_connections,
                    cap=cap, reason="the process's open-file limit (ulimit -n) leaves no more")
    return cap


class ConnectionGate:
    """A listener's connection cap and its numbers (exported as metrics)."""

    def __init__(self, protocol: str, bind: str, limit: int, refusal: bytes = b"",
                 budget: ByteBudget | None = None) -> None:
        self.protocol = protocol
        self.bind = bind
        self.limit = limit
        self.refusal = refusal  # sent before closing a connection over the cap
        self.budget = budget  # the listener's partial-request budget, if it has one
        self.active = 0
        self.refused = 0
        self.idle_closed = 0


class ByteBudget:
    """Bytes that may be held at once; `acquire` waits (bounded) for room, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0
        self._room = trio.Event()

    async def acquire(self, size: int, timeout: float) -> int:
        """Reserve `size` bytes (at most the whole budget); the bytes reserved, or 0 when no room
        came within `timeout`."""
        size = min(size, self.limit)
        with trio.move_on_after(timeout):
            while self.used + size > self.limit:
                await self._room.wait()
            self.used += size
            return size
        self.refused += 1
        return 0

    def try_acquire(self, size: int) -> bool:
        """Reserve `size` bytes (at most the whole budget) if there is room now."""
        size = min(size, self.limit)
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            self._room.set()
            self._room = trio.Event()


class IdleWatch:
    """Calls `on_idle` once nothing was `touch`ed for `timeout` seconds (0: never)."""

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self.timeout = timeout
        self.on_idle = on_idle
        self.last = trio.current_time()

    def touch(self) -> None:
        self.last = trio.current_time()

    async def run(self) -> None:
        if self.timeout <= 0:
            return
        while True:
            await trio.sleep_until(self.last + self.timeout)
            if trio.current_time() - self.last >= self.timeout:
                self.on_idle()
                return


async def accept_forever(listener: trio.SocketListener, handle: Callable[[trio.SocketStream], Awaitable[None]],
                         nursery: trio.Nursery, protocol: str, gate: ConnectionGate | None = None) -> None:
    """Accept until cancelled; each connection is served by `handle` in `nursery`, up to the gate's cap."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                log.error("accept_failed", protocol=protocol, error=str(exc))
                await trio.sleep(0.1)
                continue
            raise
        if gate is None:
            nursery.start_soon(handle, stream)
        elif gate.active >= gate.limit:
            gate.refused += 1
            nursery.start_soon(_refuse, stream, gate.refusal)
        else:
            gate.active += 1
            nursery.start_soon(_gated, handle, stream, gate)


async def _gated(handle: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream,
                 gate: ConnectionGate) -> None:
    try:
        await handle(stream)
    finally:
        gate.active -= 1


async def _refuse(stream: trio.SocketStream, refusal: bytes) -> None:
    """Over the cap: say so (briefly: a client that does not read must not hold us) and close."""
    with trio.move_on_after(1.0):
        try:
            if refusal:
                await stream.send_all(refusal)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    with trio.CancelScope(shield=True):
        await stream.aclose()
