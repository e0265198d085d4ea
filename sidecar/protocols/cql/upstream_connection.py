"""One native-protocol connection from the sidecar to Cassandra, multiplexing up to 32767 requests.

Requests are queued synchronously (no task per request) and their responses
handed to callbacks by stream id; event frames (stream -1) go to ``on_event``.
Pooling and routing across connections is :mod:`.upstream`'s.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Final

import trio

from sidecar.logs import get_logger

from .frames import FLAG_COMPRESSION, REQUEST_V4, Frame, FrameDecoder
from .messages import (
    Error,
    RequestMessage,
    Response,
    decode_response,
    encode_request_body,
)
from .types import CqlProtocolError

__all__ = [
    "UpstreamConnection",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "credential_key",
    "plain_username",
]

log = get_logger("cql.upstream")

MAX_STREAM_ID: Final = 32767

_HEADER = struct.Struct(">BBhBi")

Callback = Callable[[Frame | None], None]


class UpstreamUnavailable(Exception):
    """Cassandra could not be reached, did not answer in time, or the connection broke."""


class UpstreamRejected(Exception):
    """Cassandra answered with an ERROR (bad credentials, unknown keyspace, ...): relay it as is."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


def credential_key(token: bytes | None) -> bytes | None:
    """Pools and the verified-credentials cache are keyed by a digest, never by the secret itself."""
    return None if token is None else hashlib.sha256(token).digest()


def plain_username(token: bytes | None) -> str:
    """The user of a SASL PLAIN token (``\\0user\\0password``), for logs."""
    if not token:
        return ""
    parts = token.split(b"\x00")
    return parts[1].decode("utf-8", "replace") if len(parts) == 3 else "?"


class UpstreamConnection:
    """One TCP connection to Cassandra with up to 32767 requests in flight.

    ``send`` is synchronous (it queues the frame for the writer task), so the
    proxy forwards a request without spawning a task; ``callback(frame)`` runs
    on the reader task when the response arrives, ``callback(None)`` if the
    connection dies first.
    """

    def __init__(self, stream: trio.abc.Stream, address: str, on_event: Callable[[Frame], None]) -> None:
        self.stream = stream
        self.address = address
        self.on_event = on_event
        self.decoder = FrameDecoder(supported_versions=(4,))
        self.pending: dict[int, Callback] = {}
        self.free: list[int] = list(range(MAX_STREAM_ID, 0, -1))
        self.closed = False
        self.closed_event = trio.Event()
        self._out = bytearray()
        self._wake = trio.Event()
        self._cancel = trio.CancelScope()

    @property
    def inflight(self) -> int:
        return len(self.pending)

    def send(self, opcode: int, flags: int, body: bytes, callback: Callback) -> bool:
        """Queue a request; False when the connection is closed or out of stream ids."""
        if self.closed or not self.free:
            return False
        sid = self.free.pop()
        self.pending[sid] = callback
        out = self._out
        out += _HEADER.pack(REQUEST_V4, flags & ~FLAG_COMPRESSION, sid, opcode, len(body))
        out += body
        if not self._wake.is_set():
            self._wake.set()
        return True

    async def request(self, message: RequestMessage, timeout: float) -> Response:
        """Send one message and wait for its decoded response (the sidecar's own queries)."""
        done = trio.Event()
        box: list[Frame | None] = []

        def callback(frame: Frame | None) -> None:
            box.append(frame)
            done.set()

        if not self.send(message.opcode, 0, encode_request_body(message), callback):
            raise UpstreamUnavailable(f"connection to Cassandra at {self.address} is closed")
        with trio.move_on_after(timeout):
            await done.wait()
        if not box:
            raise UpstreamUnavailable(f"Cassandra at {self.address} did not answer within {timeout:.0f}s")
        frame = box[0]
        if frame is None:
            raise UpstreamUnavailable(f"connection to Cassandra at {self.address} was lost")
        try:
            return decode_response(frame)
        except CqlProtocolError as exc:
            raise UpstreamUnavailable(f"unreadable answer from Cassandra at {self.address}: {exc}") from None

    async def run(self) -> None:
        """Reader and writer until the connection closes; then every pending request gets None."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, CqlProtocolError) as group:
            exc = group.exceptions[0]
            log.warning("upstream_connection_lost", address=self.address, error=str(exc) or type(exc).__name__)
        finally:
            self._shutdown()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def close(self) -> None:
        self.closed = True
        self._cancel.cancel()

    def _shutdown(self) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for callback in pending.values():
            try:
                callback(None)
            except Exception:  # one broken callback must not strand the others
                log.error("upstream_callback_failed", exc_info=True)
        self.closed_event.set()

    async def _read_loop(self) -> None:
        decoder = self.decoder
        pending = self.pending
        free = self.free
        while True:
            data = await self.stream.receive_some(262144)
            if not data:
                log.info("upstream_closed_by_peer", address=self.address)
                return
            for frame in decoder.feed(data):
                if not isinstance(frame, Frame):
                    raise CqlProtocolError("Cassandra answered with an unsupported protocol version")
                sid = frame.stream
                if sid < 0:
                    self.on_event(frame)
                    continue
                callback = pending.pop(sid, None)
                if callback is None:
                    continue
                free.append(sid)
                try:
                    callback(frame)
                except Exception:
                    log.error("upstream_callback_failed", exc_info=True)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._out:
                data, self._out = self._out, bytearray()
                await self.stream.send_all(data)
