"""One app connection's protocol state, and how answers are written to it.

The server owns the socket and its tasks; the proxy decides what to answer.  This
is what both touch: the connection's handshake state, keyspace, credentials and
compression, the frame writers, and the bookkeeping of requests in flight (so a
shutdown can wait for them).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from sidecar.logs import get_logger

from .frames import (
    CLIENT_FRAME_LENGTH,
    FLAG_COMPRESSION,
    PREAUTH_FRAME_LENGTH,
    RESPONSE_V4,
    Compression,
    Frame,
    FrameDecoder,
)
from .messages import Error, ErrorCode, Request, ResponseMessage, UnavailableInfo, decode_request, encode_response
from .mutations import MutationError
from .system_tables import LocalNode
from .types import Consistency, CqlProtocolError
from .upstream import UpstreamPool, UpstreamRejected, UpstreamUnavailable

__all__ = ["AUTH_STATE", "COMPRESS_MIN", "READY_STATE", "STARTUP_STATE", "Client", "upstream_error"]

log = get_logger("cql")

_HEADER = struct.Struct(">BBhBi")
STARTUP_STATE: Final = 0
AUTH_STATE: Final = 1
READY_STATE: Final = 2
COMPRESS_MIN: Final = 256  # response bodies shorter than this are sent uncompressed


def upstream_error(exc: Exception, consistency: int = Consistency.ONE) -> Error:
    """What an app is told when Cassandra could not be asked (or said no)."""
    if isinstance(exc, UpstreamRejected):
        return exc.error
    return Error(ErrorCode.UNAVAILABLE, f"walcar: {exc}", UnavailableInfo(consistency, 1, 0))


class Client:
    """One app connection's protocol state, with hooks into the server's I/O for it."""

    def __init__(
        self, send: Callable[[bytes], None], nursery: trio.Nursery, node: LocalNode, peer: str = "",
        max_frame: int = CLIENT_FRAME_LENGTH, preauth_frame: int = PREAUTH_FRAME_LENGTH,
    ) -> None:
        self._send = send
        self.nursery = nursery
        self.node = node
        self.peer = peer
        self.decoder = FrameDecoder(max_frame_length=max_frame, preauth_frame_length=preauth_frame)
        self.compression: Compression | None = None
        self.state = STARTUP_STATE
        self.keyspace: str | None = None
        self.token: bytes | None = None
        self.pool: UpstreamPool | None = None
        self.registered = False
        self.inflight = 0
        self.closed = False

    def ready(self) -> None:
        """The handshake is done (authenticated, or READY without auth): full-size frames from now on."""
        self.state = READY_STATE
        self.decoder.authenticated()

    def decode(self, frame: Frame) -> Request | None:
        """The request in ``frame``; None when it is malformed, after answering its ProtocolError.

        Every request is decoded in full before it goes anywhere: a malformed frame forwarded raw
        could make Cassandra close an upstream connection other apps share.
        """
        try:
            return decode_request(frame)
        except CqlProtocolError as exc:
            self.respond(frame.stream, Error(exc.code, exc.message))
            return None

    # --- output ----------------------------------------------------------------

    def send_frame(self, stream: int, flags: int, opcode: int, body: bytes) -> None:
        if self.closed:
            return
        comp = self.compression
        # Compression is per frame (its flag): tiny bodies only grow and cost both ends CPU.
        if comp is not None and len(body) >= COMPRESS_MIN:
            body = comp.compress(body)
            flags |= FLAG_COMPRESSION
        send = self._send
        send(_HEADER.pack(RESPONSE_V4, flags, stream, opcode, len(body)))
        send(body)

    def relay(self, stream: int, frame: Frame) -> None:
        """An upstream response, passed on under the app's stream id."""
        self.send_frame(stream, frame.flags, frame.opcode, frame.body)

    def respond(
        self,
        stream: int,
        message: ResponseMessage,
        *,
        custom_payload: dict[str, bytes | None] | None = None,
        compress: bool = True,
    ) -> None:
        if self.closed:
            return
        frame = encode_response(message, stream, custom_payload=custom_payload)
        if compress and self.compression is not None:
            self.send_frame(stream, frame[1], frame[4], frame[9:])
        else:
            self._send(frame)

    # --- request bookkeeping -----------------------------------------------------

    def spawn(self, stream: int, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a request's slow path as a task; its failures become an ERROR on its stream."""
        if self.closed:
            return
        self.inflight += 1
        self.nursery.start_soon(self._guarded, stream, fn, args)

    async def _guarded(self, stream: int, fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except MutationError as exc:
            self.respond(stream, Error.invalid(str(exc)))
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            self.respond(stream, upstream_error(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.error("cql_request_failed", exc_info=True, peer=self.peer, error=str(exc))
            self.respond(stream, Error.server_error(f"walcar internal error: {exc}"))
        finally:
            self.inflight -= 1
