"""Native protocol v4 framing, sans-I/O: bytes in -> frames out, frames -> bytes.

A frame is a 9-byte header (version byte whose top bit is the direction,
flags, int16 stream id, opcode, int32 body length) followed by the body.  This
module only splits and joins frames and applies body compression; message
bodies are parsed by :mod:`.messages`.

A frame whose protocol version this side does not speak is surfaced as an
:class:`UnsupportedVersion` event rather than an exception, because drivers
negotiate by sending their newest version and downgrading when the answer is
an ERROR ProtocolError saying "Invalid or unsupported protocol version"; the
event carries the stream id and a ready-made reply.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from enum import IntEnum, IntFlag
from typing import Final, Protocol, TypeAlias

import lz4.block
import msgspec

from .types import PROTOCOL_ERROR_CODE, CqlProtocolError

try:  # snappy is optional (native lib); lz4 is the preferred compression anyway
    import snappy as _snappy
except ImportError:  # pragma: no cover - depends on the environment
    _snappy = None

__all__ = [
    "CLIENT_FRAME_LENGTH",
    "COMPRESSIONS",
    "FLAG_COMPRESSION",
    "FLAG_CUSTOM_PAYLOAD",
    "FLAG_TRACING",
    "FLAG_WARNING",
    "HEADER_LENGTH",
    "MAX_FRAME_LENGTH",
    "PREAUTH_FRAME_LENGTH",
    "REQUEST_V4",
    "RESPONSE_V4",
    "Compression",
    "Frame",
    "FrameDecoder",
    "FrameEvent",
    "FrameFlag",
    "LZ4Compression",
    "Opcode",
    "UnsupportedVersion",
    "encode_frame",
    "encode_header",
    "get_compression",
    "snappy_length",
    "unsupported_version_message",
]

HEADER_LENGTH: Final = 9
MAX_FRAME_LENGTH: Final = 256 * 1024 * 1024  # the spec's 256MB body limit
# What an app connection may send: Cassandra's own default native_transport_max_frame_size,
# and far less before the connection is ready (authenticated, or READY when there is no auth):
# a stranger must not make the sidecar hold a large frame.
CLIENT_FRAME_LENGTH: Final = 16 * 1024 * 1024
PREAUTH_FRAME_LENGTH: Final = 64 * 1024
DIRECTION_RESPONSE: Final = 0x80
VERSION_MASK: Final = 0x7F
REQUEST_V4: Final = 0x04
RESPONSE_V4: Final = 0x84

_HEADER = struct.Struct(">BBhBi")  # v3+: version, flags, stream, opcode, length
_HEADER_V12 = struct.Struct(">BBbBi")  # v1/v2: 1-byte stream, 8-byte header (only for version replies)
_LENGTH = struct.Struct(">I")
_STREAM = struct.Struct(">h")


class FrameFlag(IntFlag):
    COMPRESSION = 0x01
    TRACING = 0x02
    CUSTOM_PAYLOAD = 0x04
    WARNING = 0x08
    USE_BETA = 0x10


# plain-int twins of FrameFlag for hot paths: IntFlag arithmetic builds enum members (~1us each)
FLAG_COMPRESSION: Final = 0x01
FLAG_TRACING: Final = 0x02
FLAG_CUSTOM_PAYLOAD: Final = 0x04
FLAG_WARNING: Final = 0x08


class Opcode(IntEnum):
    ERROR = 0x00
    STARTUP = 0x01
    READY = 0x02
    AUTHENTICATE = 0x03
    OPTIONS = 0x05
    SUPPORTED = 0x06
    QUERY = 0x07
    RESULT = 0x08
    PREPARE = 0x09
    EXECUTE = 0x0A
    REGISTER = 0x0B
    EVENT = 0x0C
    BATCH = 0x0D
    AUTH_CHALLENGE = 0x0E
    AUTH_RESPONSE = 0x0F
    AUTH_SUCCESS = 0x10


class Frame(msgspec.Struct, gc=False):
    """One frame.  ``version`` is the raw header byte (0x04 request, 0x84 response).

    Frames yielded by :class:`FrameDecoder` always carry a plain body: a
    compressed body is inflated and its COMPRESSION flag cleared.
    """

    version: int
    flags: int
    stream: int
    opcode: int
    body: bytes = b""

    @property
    def protocol_version(self) -> int:
        return self.version & VERSION_MASK

    @property
    def is_response(self) -> bool:
        return bool(self.version & DIRECTION_RESPONSE)


def unsupported_version_message(version: int, supported: Iterable[int]) -> str:
    """Cassandra's own wording (``ProtocolVersion.invalidVersionMessage``), which drivers grep for."""
    listed = ", ".join(f"{v}/v{v}" for v in sorted(supported))
    return f"Invalid or unsupported protocol version ({version}); supported versions are ({listed})"


class UnsupportedVersion(msgspec.Struct, frozen=True):
    """A peer spoke a protocol version this side does not: answer :meth:`reply`, then close.

    ``reply_version`` follows Cassandra: a known-old version (v1/v2) is answered
    in that version so the client can parse it, anything else in the highest
    version supported here, which some drivers (gocql) take as the version to
    retry with.
    """

    version: int
    stream: int
    reply_version: int
    message: str

    def reply(self) -> bytes:
        """The ERROR ProtocolError frame to send back on the client's stream id."""
        msg = self.message.encode("utf-8")
        body = struct.pack(">iH", PROTOCOL_ERROR_CODE, len(msg)) + msg
        return encode_header(self.reply_version | DIRECTION_RESPONSE, 0, self.stream, Opcode.ERROR, len(body)) + body


FrameEvent: TypeAlias = Frame | UnsupportedVersion


class Compression(Protocol):
    """A frame body codec negotiated by STARTUP's COMPRESSION option."""

    name: str

    def compress(self, data: bytes) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = MAX_FRAME_LENGTH) -> bytes:
        """Inflate a body; a body that declares more than `max_length` bytes is refused unread."""
        ...


class LZ4Compression:
    """The v4 lz4 body format: [int] big-endian uncompressed length, then one raw lz4 block."""

    name = "lz4"

    def compress(self, data: bytes) -> bytes:
        return _LENGTH.pack(len(data)) + lz4.block.compress(data, store_size=False)

    def decompress(self, data: bytes, max_length: int = MAX_FRAME_LENGTH) -> bytes:
        if len(data) < 4:
            raise CqlProtocolError("lz4 body shorter than its length prefix")
        (size,) = _LENGTH.unpack_from(data)
        if size > max_length:
            raise CqlProtocolError(f"lz4 body claims {size} uncompressed bytes, over the frame limit of {max_length}")
        try:
            out = lz4.block.decompress(memoryview(data)[4:], uncompressed_size=size)
        except Exception as exc:  # LZ4BlockError and friends: the block is garbage
            raise CqlProtocolError(f"corrupt lz4 body: {exc}") from None
        if len(out) != size:  # lz4.block does not insist on an exact fill
            raise CqlProtocolError(f"lz4 body inflated to {len(out)} bytes, header said {size}")
        return out


class SnappyCompression:
    """Snappy framing as Cassandra uses it (plain snappy block); only offered if ``snappy`` imports."""

    name = "snappy"

    def compress(self, data: bytes) -> bytes:
        return bytes(_snappy.compress(data))

    def decompress(self, data: bytes, max_length: int = MAX_FRAME_LENGTH) -> bytes:
        size = snappy_length(data)
        if size > max_length:
            raise CqlProtocolError(f"snappy body claims {size} uncompressed bytes, over the limit of {max_length}")
        try:
            return bytes(_snappy.decompress(data))
        except Exception as exc:  # snappy raises its own error types
            raise CqlProtocolError(f"corrupt snappy body: {exc}") from None


def snappy_length(data: bytes) -> int:
    """The uncompressed length a snappy block declares (its varint preamble), read before inflating."""
    size = shift = 0
    for index in range(min(len(data), 5)):  # a 32-bit length takes at most 5 varint bytes
        byte = data[index]
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return size
        shift += 7
    raise CqlProtocolError("snappy body without a valid length preamble")


COMPRESSIONS: Final[dict[str, Compression]] = {"lz4": LZ4Compression()}
if _snappy is not None:  # pragma: no cover - depends on the environment
    COMPRESSIONS["snappy"] = SnappyCompression()


def get_compression(name: str | None) -> Compression | None:
    """The codec for a STARTUP ``COMPRESSION`` value (case-insensitive), or None if unknown/absent."""
    if not name:
        return None
    return COMPRESSIONS.get(name.lower())


def encode_header(version: int, flags: int, stream: int, opcode: int, length: int) -> bytes:
    if version & VERSION_MASK < 3:
        return _HEADER_V12.pack(version, flags, stream, opcode, length)
    return _HEADER.pack(version, flags, stream, opcode, length)


def encode_frame(frame: Frame, compression: Compression | None = None) -> bytes:
    """Serialize a frame; with ``compression`` a non-empty body is compressed and flagged.

    A frame that already has the COMPRESSION flag is assumed to carry a
    compressed body and is written as is.
    """
    body = frame.body
    flags = frame.flags
    if compression is not None and body and not flags & FLAG_COMPRESSION:
        body = compression.compress(body)
        flags |= FLAG_COMPRESSION
    return encode_header(frame.version, flags, frame.stream, frame.opcode, len(body)) + body


class FrameDecoder:
    """Incremental frame splitter: ``for event in decoder.feed(data): ...``.

    ``max_frame_length`` bounds every frame body, compressed or inflated; with
    ``preauth_frame_length`` the bound is that smaller one until :meth:`authenticated`
    (the connection is ready). A body's length is checked from its header, before any
    of it is buffered; an inflated length from the compressed body's preamble, before
    inflating. :attr:`pending_length` is the length of a frame still arriving, for a
    server that budgets what it buffers.

    Yields :class:`Frame` for every complete frame and, at most once,
    :class:`UnsupportedVersion` (after which it ignores all further input: the
    connection is to be answered and closed).  A partial frame simply stays
    buffered.  Framing violations (negative or oversized length) raise a fatal
    :class:`CqlProtocolError` carrying the stream id, and every later call
    raises it again; a body that fails to decompress raises a non-fatal one and
    the frame is skipped.  Set :attr:`compression` once STARTUP negotiated it.
    """

    def __init__(
        self,
        *,
        max_frame_length: int = MAX_FRAME_LENGTH,
        supported_versions: Iterable[int] = (4,),
        compression: Compression | None = None,
        preauth_frame_length: int | None = None,
    ) -> None:
        self.supported_versions = frozenset(supported_versions)
        if not self.supported_versions or min(self.supported_versions) < 3:
            raise ValueError("supported_versions must be protocol versions >= 3")
        self._full_length = max_frame_length
        self.preauth = preauth_frame_length is not None
        self.max_frame_length = min(max_frame_length, preauth_frame_length or max_frame_length)
        self.pending_length = 0  # body length of a frame whose header came and body has not
        self.compression = compression
        self._buf = bytearray()
        self._pos = 0
        self._failure: CqlProtocolError | None = None
        self._stopped = False

    def authenticated(self) -> None:
        """The connection is ready: frames up to the full limit from now on."""
        self.preauth = False
        self.max_frame_length = self._full_length

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[FrameEvent]:
        """Buffer ``data`` now and return an iterator over the events it completes."""
        if data and not self._stopped:
            self._buf += data
        return self._drain()

    def _drain(self) -> Iterator[FrameEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def __iter__(self) -> Iterator[FrameEvent]:
        return self._drain()

    def next_event(self) -> FrameEvent | None:
        """The next complete event, or None when more data is needed."""
        if self._failure is not None:
            raise self._failure
        if self._stopped:
            return None
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_LENGTH:
            if avail and (buf[pos] & VERSION_MASK) not in self.supported_versions:
                return self._unsupported(buf, pos, avail)
            self._compact()
            return None
        version, flags, stream, opcode, length = _HEADER.unpack_from(buf, pos)
        if (version & VERSION_MASK) not in self.supported_versions:
            return self._unsupported(buf, pos, avail)
        if length < 0 or length > self.max_frame_length:
            if length < 0:
                message = f"invalid frame body length {length}"
            elif self.preauth:
                message = (f"Request is too big: length {length} exceeds maximum allowed length "
                           f"{self.max_frame_length} before the connection is authenticated")
            else:  # Cassandra's wording
                message = f"Request is too big: length {length} exceeds maximum allowed length {self.max_frame_length}"
            self._failure = CqlProtocolError(message, stream=stream, fatal=True)
            raise self._failure
        start = pos + HEADER_LENGTH
        end = start + length
        if end > len(buf):
            self.pending_length = length
            self._compact()
            return None
        self.pending_length = 0
        with memoryview(buf) as view:
            body = bytes(view[start:end])
        self._pos = end
        if flags & FLAG_COMPRESSION:
            if self.compression is None:
                raise CqlProtocolError("compressed frame but no compression was negotiated", stream=stream)
            try:
                body = self.compression.decompress(body, self.max_frame_length)
            except CqlProtocolError as exc:
                exc.stream = stream
                raise
            flags &= ~FLAG_COMPRESSION
        return Frame(version, flags, stream, opcode, body)

    def _unsupported(self, buf: bytearray, pos: int, avail: int) -> UnsupportedVersion | None:
        requested = buf[pos] & VERSION_MASK
        old = requested in (1, 2)
        if avail < (3 if old else 4):
            return None  # wait for the stream id so the reply lands on the right stream
        stream = buf[pos + 2] - (256 if buf[pos + 2] > 127 else 0) if old else _STREAM.unpack_from(buf, pos + 2)[0]
        self._stopped = True
        self._buf = bytearray()
        self._pos = 0
        return UnsupportedVersion(
            version=requested,
            stream=stream,
            reply_version=requested if old else max(self.supported_versions),
            message=unsupported_version_message(requested, self.supported_versions),
        )

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
