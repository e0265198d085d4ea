"""Accepting TCP connections for the protocol servers (memcached, CQL)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from sidecar.logs import get_logger

log = get_logger("tcp")

# Out of descriptors or memory: the listener is fine, the moment is not. Wait and go on.
_TRANSIENT: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def accept_forever(listener: trio.SocketListener, handle: Callable[[trio.SocketStream], Awaitable[None]],
                         nursery: trio.Nursery, protocol: str) -> None:
    """Accept until cancelled; each connection is served by `handle` in `nursery`."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                log.error("accept_failed", protocol=protocol, error=str(exc))
                await trio.sleep(0.1)
                continue
            raise
        nursery.start_soon(handle, stream)
