"""Native protocol v4 messages: the codec's entry points for both directions, by opcode.

The proxy sits in the middle, so it needs all four paths: decode requests from
apps and encode its own responses (server side), encode requests towards
Cassandra and decode what comes back (client side).  The message structs and
their body codecs live in :mod:`.requests`, :mod:`.responses` and :mod:`.errors`;
this module re-exports them, so callers import every message from one place.  Envelope extras that live
in the body -- request custom payload; response tracing id, warnings and custom
payload -- are handled by :class:`Request`/:class:`Response` and the
``encode_*``/``decode_*`` functions.

Decoders raise only :class:`~.types.CqlProtocolError` (with the frame's stream
id filled in); encoders raise ``ValueError``/``TypeError`` on structs that
cannot be represented.  Trailing body bytes are ignored, as the spec asks.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping

import msgspec

from .errors import (
    AUTHENTICATION_ERROR,
    AlreadyExistsInfo,
    Error,
    ErrorCode,
    ErrorDetail,
    FunctionFailureInfo,
    ReadFailureInfo,
    ReadTimeoutInfo,
    UnavailableInfo,
    UnpreparedInfo,
    WriteFailureInfo,
    WriteTimeoutInfo,
)
from .frames import (
    FLAG_COMPRESSION,
    FLAG_CUSTOM_PAYLOAD,
    FLAG_TRACING,
    FLAG_WARNING,
    REQUEST_V4,
    RESPONSE_V4,
    Compression,
    Frame,
    encode_header,
)
from .requests import (
    REQUEST_DECODERS,
    REQUEST_ENCODERS,
    AuthResponse,
    Batch,
    BatchStatement,
    BatchType,
    Execute,
    Options,
    Prepare,
    Query,
    QueryFlag,
    QueryParameters,
    Register,
    RequestMessage,
    Startup,
)
from .responses import (
    RESPONSE_DECODERS,
    RESPONSE_ENCODERS,
    VOID_BODY,
    AuthChallenge,
    Authenticate,
    AuthSuccess,
    ColumnSpec,
    EventMessage,
    PreparedMetadata,
    PreparedResult,
    Ready,
    ResponseMessage,
    ResultKind,
    ResultMessage,
    RowsMetadata,
    RowsResult,
    SchemaChangeEvent,
    SchemaChangeResult,
    SetKeyspaceResult,
    StatusChangeEvent,
    Supported,
    TopologyChangeEvent,
    VoidResult,
)
from .types import CqlProtocolError
from .wire import (
    Reader,
    write_bytes_map,
    write_string_list,
)

__all__ = [
    "AUTHENTICATION_ERROR",
    "AlreadyExistsInfo",
    "AuthChallenge",
    "AuthResponse",
    "AuthSuccess",
    "Authenticate",
    "Batch",
    "BatchStatement",
    "BatchType",
    "ColumnSpec",
    "Error",
    "ErrorCode",
    "ErrorDetail",
    "EventMessage",
    "Execute",
    "FunctionFailureInfo",
    "Options",
    "Prepare",
    "PreparedMetadata",
    "PreparedResult",
    "Query",
    "QueryFlag",
    "QueryParameters",
    "ReadFailureInfo",
    "ReadTimeoutInfo",
    "Ready",
    "Register",
    "Request",
    "RequestMessage",
    "Response",
    "ResponseMessage",
    "ResultKind",
    "ResultMessage",
    "RowsMetadata",
    "RowsResult",
    "SchemaChangeEvent",
    "SchemaChangeResult",
    "SetKeyspaceResult",
    "Startup",
    "StatusChangeEvent",
    "Supported",
    "TopologyChangeEvent",
    "UnavailableInfo",
    "UnpreparedInfo",
    "VoidResult",
    "WriteFailureInfo",
    "WriteTimeoutInfo",
    "decode_request",
    "decode_request_body",
    "decode_response",
    "decode_response_body",
    "encode_request",
    "encode_request_body",
    "encode_response",
    "encode_response_body",
]

# --------------------------------------------------------------------------- envelopes


class Request(msgspec.Struct):
    """A decoded request frame: the message plus what the frame header/body prefix said about it."""

    stream: int
    message: RequestMessage
    tracing: bool = False
    custom_payload: dict[str, bytes | None] | None = None

    def encode(self, compression: Compression | None = None) -> bytes:
        return encode_request(
            self.message,
            self.stream,
            tracing=self.tracing,
            custom_payload=self.custom_payload,
            compression=compression,
        )


class Response(msgspec.Struct):
    """A decoded response frame with its optional tracing id, warnings and custom payload."""

    stream: int
    message: ResponseMessage
    tracing_id: uuid.UUID | None = None
    warnings: list[str] | None = None
    custom_payload: dict[str, bytes | None] | None = None

    def encode(self, compression: Compression | None = None) -> bytes:
        return encode_response(
            self.message,
            self.stream,
            tracing_id=self.tracing_id,
            warnings=self.warnings,
            custom_payload=self.custom_payload,
            compression=compression,
        )



# --------------------------------------------------------------------------- public entry points


def _bad_opcode(opcode: int, expected: str, other_direction: Mapping[int, object]) -> CqlProtocolError:
    """Cassandra's wording for an opcode that is unknown or belongs to the other direction."""
    if opcode in other_direction:
        got = "RESPONSE" if expected == "REQUEST" else "REQUEST"
        return CqlProtocolError(f"Wrong protocol direction (expected {expected}, got {got}) for opcode {opcode}")
    return CqlProtocolError(f"Unknown opcode {opcode}")


def decode_request_body(opcode: int, body: bytes | bytearray | memoryview) -> RequestMessage:
    """Parse a request body (no envelope prefix) by opcode."""
    decoder = REQUEST_DECODERS.get(opcode)
    if decoder is None:
        raise _bad_opcode(opcode, "REQUEST", RESPONSE_DECODERS)
    return decoder(Reader(body))


def decode_response_body(opcode: int, body: bytes | bytearray | memoryview) -> ResponseMessage:
    """Parse a response body (no envelope prefix) by opcode."""
    decoder = RESPONSE_DECODERS.get(opcode)
    if decoder is None:
        raise _bad_opcode(opcode, "RESPONSE", REQUEST_DECODERS)
    return decoder(Reader(body))


def decode_request(frame: Frame) -> Request:
    """Decode a (decompressed) request frame; errors carry ``frame.stream`` for the ERROR reply."""
    try:
        if frame.version & 0x80:
            raise CqlProtocolError("Wrong protocol direction (expected REQUEST, got RESPONSE)")
        decoder = REQUEST_DECODERS.get(frame.opcode)
        if decoder is None:
            raise _bad_opcode(frame.opcode, "REQUEST", RESPONSE_DECODERS)
        r = Reader(frame.body)
        payload = r.read_bytes_map() if frame.flags & FLAG_CUSTOM_PAYLOAD else None
        return Request(frame.stream, decoder(r), bool(frame.flags & FLAG_TRACING), payload)
    except CqlProtocolError as exc:
        exc.stream = frame.stream
        raise


def decode_response(frame: Frame) -> Response:
    """Decode a (decompressed) response frame including tracing id, warnings and custom payload."""
    try:
        if not frame.version & 0x80:
            raise CqlProtocolError("Wrong protocol direction (expected RESPONSE, got REQUEST)")
        decoder = RESPONSE_DECODERS.get(frame.opcode)
        if decoder is None:
            raise _bad_opcode(frame.opcode, "RESPONSE", REQUEST_DECODERS)
        r = Reader(frame.body)
        flags = frame.flags
        tracing_id = r.read_uuid() if flags & FLAG_TRACING else None
        warnings = r.read_string_list() if flags & FLAG_WARNING else None
        payload = r.read_bytes_map() if flags & FLAG_CUSTOM_PAYLOAD else None
        return Response(frame.stream, decoder(r), tracing_id, warnings, payload)
    except CqlProtocolError as exc:
        exc.stream = frame.stream
        raise


def encode_request_body(message: RequestMessage) -> bytes:
    encoder = REQUEST_ENCODERS.get(type(message))
    if encoder is None:
        raise TypeError(f"not a request message: {type(message).__name__}")
    out = bytearray()
    try:
        encoder(message, out)
    except struct.error as exc:
        raise ValueError(f"cannot encode {type(message).__name__}: {exc}") from None
    return bytes(out)


def encode_response_body(message: ResponseMessage) -> bytes:
    if type(message) is VoidResult:
        return VOID_BODY
    encoder = RESPONSE_ENCODERS.get(type(message))
    if encoder is None:
        raise TypeError(f"not a response message: {type(message).__name__}")
    out = bytearray()
    try:
        encoder(message, out)
    except struct.error as exc:
        raise ValueError(f"cannot encode {type(message).__name__}: {exc}") from None
    return bytes(out)


def _finish(
    version: int, flags: int, stream: int, opcode: int, body: bytes, compression: Compression | None
) -> bytes:
    if compression is not None and body:
        body = compression.compress(body)
        flags |= FLAG_COMPRESSION
    try:
        return encode_header(version, flags, stream, opcode, len(body)) + body
    except struct.error as exc:
        raise ValueError(f"cannot encode frame header: {exc}") from None


def encode_request(
    message: RequestMessage,
    stream: int = 0,
    *,
    tracing: bool = False,
    custom_payload: Mapping[str, bytes | None] | None = None,
    compression: Compression | None = None,
    version: int = REQUEST_V4,
) -> bytes:
    """A complete request frame.  ``custom_payload`` is only meaningful on QUERY/PREPARE/EXECUTE/BATCH."""
    body = encode_request_body(message)
    flags = FLAG_TRACING if tracing else 0
    if custom_payload:
        prefix = bytearray()
        write_bytes_map(prefix, custom_payload)
        body = bytes(prefix) + body
        flags |= FLAG_CUSTOM_PAYLOAD
    return _finish(version, flags, stream, message.opcode, body, compression)


def encode_response(
    message: ResponseMessage,
    stream: int = 0,
    *,
    tracing_id: uuid.UUID | None = None,
    warnings: list[str] | None = None,
    custom_payload: Mapping[str, bytes | None] | None = None,
    compression: Compression | None = None,
    version: int = RESPONSE_V4,
) -> bytes:
    """A complete response frame; envelope extras are written in spec order (tracing, warnings, payload)."""
    body = encode_response_body(message)
    flags = 0
    if tracing_id is not None or warnings or custom_payload:
        prefix = bytearray()
        if tracing_id is not None:
            flags |= FLAG_TRACING
            prefix += tracing_id.bytes
        if warnings:
            flags |= FLAG_WARNING
            write_string_list(prefix, warnings)
        if custom_payload:
            flags |= FLAG_CUSTOM_PAYLOAD
            write_bytes_map(prefix, custom_payload)
        body = bytes(prefix) + body
    return _finish(version, flags, stream, message.opcode, body, compression)
