"""Native protocol v4 message bodies: typed structs, decoders and encoders for both directions.

The proxy sits in the middle, so it needs all four paths: decode requests from
apps and encode its own responses (server side), encode requests towards
Cassandra and decode what comes back (client side).  Envelope extras that live
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
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

import msgspec

from .frames import (
    FLAG_COMPRESSION,
    FLAG_CUSTOM_PAYLOAD,
    FLAG_TRACING,
    FLAG_WARNING,
    REQUEST_V4,
    RESPONSE_V4,
    Compression,
    Frame,
    Opcode,
    encode_header,
)
from .types import Consistency, CqlProtocolError, DataType, Value
from .wire import (
    Reader,
    write_bytes,
    write_bytes_map,
    write_inet,
    write_int,
    write_long,
    write_long_string,
    write_option,
    write_short,
    write_short_bytes,
    write_string,
    write_string_list,
    write_string_map,
    write_string_multimap,
    write_value,
)

# --------------------------------------------------------------------------- constants


class ErrorCode(IntEnum):
    SERVER_ERROR = 0x0000
    PROTOCOL_ERROR = 0x000A
    BAD_CREDENTIALS = 0x0100  # a.k.a. AuthenticationError
    UNAVAILABLE = 0x1000
    OVERLOADED = 0x1001
    IS_BOOTSTRAPPING = 0x1002
    TRUNCATE_ERROR = 0x1003
    WRITE_TIMEOUT = 0x1100
    READ_TIMEOUT = 0x1200
    READ_FAILURE = 0x1300
    FUNCTION_FAILURE = 0x1400
    WRITE_FAILURE = 0x1500
    SYNTAX_ERROR = 0x2000
    UNAUTHORIZED = 0x2100
    INVALID = 0x2200
    CONFIG_ERROR = 0x2300
    ALREADY_EXISTS = 0x2400
    UNPREPARED = 0x2500


AUTHENTICATION_ERROR: Final = ErrorCode.BAD_CREDENTIALS


class ResultKind(IntEnum):
    VOID = 0x0001
    ROWS = 0x0002
    SET_KEYSPACE = 0x0003
    PREPARED = 0x0004
    SCHEMA_CHANGE = 0x0005


class BatchType(IntEnum):
    LOGGED = 0
    UNLOGGED = 1
    COUNTER = 2


class QueryFlag(IntEnum):
    VALUES = 0x01
    SKIP_METADATA = 0x02
    PAGE_SIZE = 0x04
    PAGING_STATE = 0x08
    SERIAL_CONSISTENCY = 0x10
    DEFAULT_TIMESTAMP = 0x20
    NAMES_FOR_VALUES = 0x40


_ROWS_GLOBAL_TABLES_SPEC: Final = 0x0001
_ROWS_HAS_MORE_PAGES: Final = 0x0002
_ROWS_NO_METADATA: Final = 0x0004
_MAX_EMPTY_ROWS: Final = 1 << 16  # zero-column rows cost no bytes; bound them so garbage cannot allocate GBs

# --------------------------------------------------------------------------- requests


class Startup(msgspec.Struct):
    """STARTUP: connection options; CQL_VERSION is mandatory, COMPRESSION picks the body codec."""

    opcode: ClassVar[int] = Opcode.STARTUP
    options: dict[str, str]

    @property
    def cql_version(self) -> str | None:
        return self.options.get("CQL_VERSION")

    @property
    def compression(self) -> str | None:
        return self.options.get("COMPRESSION")


class AuthResponse(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.AUTH_RESPONSE
    token: bytes | None


class Options(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.OPTIONS


class QueryParameters(msgspec.Struct):
    """<query_parameters> shared by QUERY and EXECUTE; header flags derive from which fields are set.

    ``values`` is None when the VALUES flag is absent; ``names`` (same length)
    only when values are bound by name (flag 0x40).
    """

    consistency: int
    values: list[Value] | None = None
    names: list[str] | None = None
    skip_metadata: bool = False
    page_size: int | None = None
    paging_state: bytes | None = None
    serial_consistency: int | None = None
    timestamp: int | None = None


class Query(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.QUERY
    query: str
    params: QueryParameters


class Prepare(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.PREPARE
    query: str


class Execute(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.EXECUTE
    query_id: bytes
    params: QueryParameters


class BatchStatement(msgspec.Struct):
    """One BATCH child: either a query string (kind 0) or a prepared id (kind 1), plus its values."""

    query: str | None = None
    query_id: bytes | None = None
    values: list[Value] = msgspec.field(default_factory=list)

    @property
    def is_prepared(self) -> bool:
        return self.query_id is not None


class Batch(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.BATCH
    batch_type: int
    statements: list[BatchStatement]
    consistency: int
    serial_consistency: int | None = None
    timestamp: int | None = None


class Register(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.REGISTER
    events: list[str]


RequestMessage: TypeAlias = Startup | AuthResponse | Options | Query | Prepare | Execute | Batch | Register

# --------------------------------------------------------------------------- responses: ERROR


class UnavailableInfo(msgspec.Struct, frozen=True):
    consistency: int
    required: int
    alive: int


class WriteTimeoutInfo(msgspec.Struct, frozen=True):
    consistency: int
    received: int
    block_for: int
    write_type: str


class ReadTimeoutInfo(msgspec.Struct, frozen=True):
    consistency: int
    received: int
    block_for: int
    data_present: bool


class ReadFailureInfo(msgspec.Struct, frozen=True):
    consistency: int
    received: int
    block_for: int
    num_failures: int
    data_present: bool


class FunctionFailureInfo(msgspec.Struct, frozen=True):
    keyspace: str
    function: str
    arg_types: list[str]


class WriteFailureInfo(msgspec.Struct, frozen=True):
    consistency: int
    received: int
    block_for: int
    num_failures: int
    write_type: str


class AlreadyExistsInfo(msgspec.Struct, frozen=True):
    keyspace: str
    table: str


class UnpreparedInfo(msgspec.Struct, frozen=True):
    query_id: bytes


ErrorDetail: TypeAlias = (
    UnavailableInfo
    | WriteTimeoutInfo
    | ReadTimeoutInfo
    | ReadFailureInfo
    | FunctionFailureInfo
    | WriteFailureInfo
    | AlreadyExistsInfo
    | UnpreparedInfo
)

_DETAIL_FOR_CODE: Final[dict[int, type]] = {
    ErrorCode.UNAVAILABLE: UnavailableInfo,
    ErrorCode.WRITE_TIMEOUT: WriteTimeoutInfo,
    ErrorCode.READ_TIMEOUT: ReadTimeoutInfo,
    ErrorCode.READ_FAILURE: ReadFailureInfo,
    ErrorCode.FUNCTION_FAILURE: FunctionFailureInfo,
    ErrorCode.WRITE_FAILURE: WriteFailureInfo,
    ErrorCode.ALREADY_EXISTS: AlreadyExistsInfo,
    ErrorCode.UNPREPARED: UnpreparedInfo,
}


class Error(msgspec.Struct):
    """ERROR: ``detail`` is required exactly for the codes whose body carries more (see ``ErrorCode``)."""

    opcode: ClassVar[int] = Opcode.ERROR
    code: int
    message: str
    detail: ErrorDetail | None = None

    @classmethod
    def protocol_error(cls, message: str) -> Error:
        return cls(ErrorCode.PROTOCOL_ERROR, message)

    @classmethod
    def server_error(cls, message: str) -> Error:
        return cls(ErrorCode.SERVER_ERROR, message)

    @classmethod
    def invalid(cls, message: str) -> Error:
        return cls(ErrorCode.INVALID, message)

    @classmethod
    def overloaded(cls, message: str = "Server is overloaded") -> Error:
        return cls(ErrorCode.OVERLOADED, message)

    @classmethod
    def unavailable(cls, consistency: int, required: int, alive: int, message: str | None = None) -> Error:
        text = message or (
            f"Cannot achieve consistency level {_consistency_name(consistency)}: "
            f"required {required}, alive {alive}"
        )
        return cls(ErrorCode.UNAVAILABLE, text, UnavailableInfo(consistency, required, alive))

    @classmethod
    def unprepared(cls, query_id: bytes) -> Error:
        """Cassandra's wording; drivers react to the code by re-preparing, not to the text."""
        return cls(
            ErrorCode.UNPREPARED,
            f"Prepared query with ID {query_id.hex()} not found (either the query was not prepared on "
            "this host (maybe the host has been restarted?) or you have prepared too many queries and "
            "it has been evicted from the internal cache)",
            UnpreparedInfo(query_id),
        )


def _consistency_name(value: int) -> str:
    try:
        return Consistency(value).name
    except ValueError:
        return str(value)


# --------------------------------------------------------------------------- responses: others


class Ready(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.READY


class Authenticate(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.AUTHENTICATE
    authenticator: str


class Supported(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.SUPPORTED
    options: dict[str, list[str]]


class AuthChallenge(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.AUTH_CHALLENGE
    token: bytes | None


class AuthSuccess(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.AUTH_SUCCESS
    token: bytes | None


class ColumnSpec(msgspec.Struct, frozen=True):
    keyspace: str
    table: str
    name: str
    type: DataType


class RowsMetadata(msgspec.Struct):
    """Result set metadata.  ``columns`` None means NO_METADATA (then ``column_count`` says how many).

    The global table spec is an encoding detail: encoders use it whenever all
    columns share one table, decoders spread it onto every :class:`ColumnSpec`.
    """

    columns: list[ColumnSpec] | None = None
    paging_state: bytes | None = None
    column_count: int = 0

    def __post_init__(self) -> None:
        if self.columns is not None:
            self.column_count = len(self.columns)


class PreparedMetadata(msgspec.Struct):
    """Bind-marker metadata of a prepared statement; ``pk_indexes`` locate the partition key."""

    columns: list[ColumnSpec]
    pk_indexes: list[int] = msgspec.field(default_factory=list)


class VoidResult(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.RESULT
    kind: ClassVar[int] = ResultKind.VOID


class RowsResult(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.RESULT
    kind: ClassVar[int] = ResultKind.ROWS
    metadata: RowsMetadata
    rows: list[list[bytes | None]]


class SetKeyspaceResult(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.RESULT
    kind: ClassVar[int] = ResultKind.SET_KEYSPACE
    keyspace: str


class PreparedResult(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.RESULT
    kind: ClassVar[int] = ResultKind.PREPARED
    query_id: bytes
    metadata: PreparedMetadata
    result_metadata: RowsMetadata


class SchemaChangeResult(msgspec.Struct):
    """RESULT Schema_change; same body as the SCHEMA_CHANGE event.

    ``name`` is set for TABLE/TYPE/FUNCTION/AGGREGATE targets, ``arg_types`` for
    FUNCTION/AGGREGATE.
    """

    opcode: ClassVar[int] = Opcode.RESULT
    kind: ClassVar[int] = ResultKind.SCHEMA_CHANGE
    change_type: str
    target: str
    keyspace: str
    name: str | None = None
    arg_types: list[str] | None = None


class TopologyChangeEvent(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.EVENT
    event_type: ClassVar[str] = "TOPOLOGY_CHANGE"
    change: str  # NEW_NODE / REMOVED_NODE
    address: str
    port: int


class StatusChangeEvent(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.EVENT
    event_type: ClassVar[str] = "STATUS_CHANGE"
    change: str  # UP / DOWN
    address: str
    port: int


class SchemaChangeEvent(msgspec.Struct):
    opcode: ClassVar[int] = Opcode.EVENT
    event_type: ClassVar[str] = "SCHEMA_CHANGE"
    change_type: str
    target: str
    keyspace: str
    name: str | None = None
    arg_types: list[str] | None = None


ResultMessage: TypeAlias = VoidResult | RowsResult | SetKeyspaceResult | PreparedResult | SchemaChangeResult
EventMessage: TypeAlias = TopologyChangeEvent | StatusChangeEvent | SchemaChangeEvent
ResponseMessage: TypeAlias = (
    Error | Ready | Authenticate | Supported | ResultMessage | EventMessage | AuthChallenge | AuthSuccess
)

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


# --------------------------------------------------------------------------- request codecs


def _read_params(r: Reader) -> QueryParameters:
    consistency = r.read_short()
    flags = r.read_byte()
    values: list[Value] | None = None
    names: list[str] | None = None
    if flags & 0x01:
        n = r.read_short()
        if flags & 0x40:
            names = []
            values = []
            for _ in range(n):
                names.append(r.read_string())
                values.append(r.read_value())
        else:
            values = r.read_values(n)
    return QueryParameters(
        consistency,
        values,
        names,
        bool(flags & 0x02),
        r.read_int() if flags & 0x04 else None,
        r.read_bytes() if flags & 0x08 else None,
        r.read_short() if flags & 0x10 else None,
        r.read_long() if flags & 0x20 else None,
    )


def _write_params(out: bytearray, p: QueryParameters) -> None:
    flags = 0
    if p.values is not None:
        flags |= 0x01
        if p.names is not None:
            if len(p.names) != len(p.values):
                raise ValueError("QueryParameters.names and .values differ in length")
            flags |= 0x40
    if p.skip_metadata:
        flags |= 0x02
    if p.page_size is not None:
        flags |= 0x04
    if p.paging_state is not None:
        flags |= 0x08
    if p.serial_consistency is not None:
        flags |= 0x10
    if p.timestamp is not None:
        flags |= 0x20
    out += _SHORT_BYTE.pack(p.consistency, flags)
    if p.values is not None:
        write_short(out, len(p.values))
        if p.names is not None:
            for name, value in zip(p.names, p.values, strict=True):
                write_string(out, name)
                write_value(out, value)
        else:
            for value in p.values:
                write_value(out, value)
    if p.page_size is not None:
        write_int(out, p.page_size)
    if p.paging_state is not None:
        write_bytes(out, p.paging_state)
    if p.serial_consistency is not None:
        write_short(out, p.serial_consistency)
    if p.timestamp is not None:
        write_long(out, p.timestamp)


_SHORT_BYTE = struct.Struct(">HB")


def _dec_startup(r: Reader) -> Startup:
    return Startup(r.read_string_map())


def _dec_auth_response(r: Reader) -> AuthResponse:
    return AuthResponse(r.read_bytes())


def _dec_options(r: Reader) -> Options:
    return Options()


def _dec_query(r: Reader) -> Query:
    query = r.read_long_string()
    return Query(query, _read_params(r))


def _dec_prepare(r: Reader) -> Prepare:
    return Prepare(r.read_long_string())


def _dec_execute(r: Reader) -> Execute:
    query_id = r.read_short_bytes()
    return Execute(query_id, _read_params(r))


def _dec_batch(r: Reader) -> Batch:
    batch_type = r.read_byte()
    if batch_type > 2:
        raise CqlProtocolError(f"invalid BATCH type {batch_type}")
    statements: list[BatchStatement] = []
    for _ in range(r.read_short()):
        kind = r.read_byte()
        if kind == 0:
            stmt = BatchStatement(query=r.read_long_string())
        elif kind == 1:
            stmt = BatchStatement(query_id=r.read_short_bytes())
        else:
            raise CqlProtocolError(f"invalid BATCH statement kind {kind}")
        stmt.values = r.read_values(r.read_short())
        statements.append(stmt)
    consistency = r.read_short()
    flags = r.read_byte()
    if flags & 0x40:
        # the flag comes after the values it would govern; Cassandra rejects it too (CASSANDRA-10246)
        raise CqlProtocolError("Names for values are not supported in BATCH")
    return Batch(
        batch_type,
        statements,
        consistency,
        r.read_short() if flags & 0x10 else None,
        r.read_long() if flags & 0x20 else None,
    )


def _dec_register(r: Reader) -> Register:
    return Register(r.read_string_list())


def _enc_startup(m: Startup, out: bytearray) -> None:
    write_string_map(out, m.options)


def _enc_auth_response(m: AuthResponse, out: bytearray) -> None:
    write_bytes(out, m.token)


def _enc_empty(m: object, out: bytearray) -> None:
    return None


def _enc_query(m: Query, out: bytearray) -> None:
    write_long_string(out, m.query)
    _write_params(out, m.params)


def _enc_prepare(m: Prepare, out: bytearray) -> None:
    write_long_string(out, m.query)


def _enc_execute(m: Execute, out: bytearray) -> None:
    write_short_bytes(out, m.query_id)
    _write_params(out, m.params)


def _enc_batch(m: Batch, out: bytearray) -> None:
    out.append(m.batch_type)
    write_short(out, len(m.statements))
    for stmt in m.statements:
        if (stmt.query is None) == (stmt.query_id is None):
            raise ValueError("a BatchStatement needs exactly one of query / query_id")
        if stmt.query_id is not None:
            out.append(1)
            write_short_bytes(out, stmt.query_id)
        else:
            out.append(0)
            write_long_string(out, stmt.query or "")
        write_short(out, len(stmt.values))
        for value in stmt.values:
            write_value(out, value)
    flags = (0x10 if m.serial_consistency is not None else 0) | (0x20 if m.timestamp is not None else 0)
    out += _SHORT_BYTE.pack(m.consistency, flags)
    if m.serial_consistency is not None:
        write_short(out, m.serial_consistency)
    if m.timestamp is not None:
        write_long(out, m.timestamp)


def _enc_register(m: Register, out: bytearray) -> None:
    write_string_list(out, m.events)


_REQUEST_DECODERS: Final[dict[int, Callable[[Reader], RequestMessage]]] = {
    Opcode.STARTUP: _dec_startup,
    Opcode.AUTH_RESPONSE: _dec_auth_response,
    Opcode.OPTIONS: _dec_options,
    Opcode.QUERY: _dec_query,
    Opcode.PREPARE: _dec_prepare,
    Opcode.EXECUTE: _dec_execute,
    Opcode.BATCH: _dec_batch,
    Opcode.REGISTER: _dec_register,
}

_REQUEST_ENCODERS: Final[dict[type, Callable[[Any, bytearray], None]]] = {
    Startup: _enc_startup,
    AuthResponse: _enc_auth_response,
    Options: _enc_empty,
    Query: _enc_query,
    Prepare: _enc_prepare,
    Execute: _enc_execute,
    Batch: _enc_batch,
    Register: _enc_register,
}

# --------------------------------------------------------------------------- response codecs


def _dec_error(r: Reader) -> Error:
    code = r.read_int()
    message = r.read_string()
    detail: ErrorDetail | None = None
    if code == ErrorCode.UNAVAILABLE:
        detail = UnavailableInfo(r.read_short(), r.read_int(), r.read_int())
    elif code == ErrorCode.WRITE_TIMEOUT:
        detail = WriteTimeoutInfo(r.read_short(), r.read_int(), r.read_int(), r.read_string())
    elif code == ErrorCode.READ_TIMEOUT:
        detail = ReadTimeoutInfo(r.read_short(), r.read_int(), r.read_int(), r.read_byte() != 0)
    elif code == ErrorCode.READ_FAILURE:
        detail = ReadFailureInfo(r.read_short(), r.read_int(), r.read_int(), r.read_int(), r.read_byte() != 0)
    elif code == ErrorCode.FUNCTION_FAILURE:
        detail = FunctionFailureInfo(r.read_string(), r.read_string(), r.read_string_list())
    elif code == ErrorCode.WRITE_FAILURE:
        detail = WriteFailureInfo(r.read_short(), r.read_int(), r.read_int(), r.read_int(), r.read_string())
    elif code == ErrorCode.ALREADY_EXISTS:
        detail = AlreadyExistsInfo(r.read_string(), r.read_string())
    elif code == ErrorCode.UNPREPARED:
        detail = UnpreparedInfo(r.read_short_bytes())
    return Error(code, message, detail)


def _enc_error(m: Error, out: bytearray) -> None:
    write_int(out, m.code)
    write_string(out, m.message)
    expected = _DETAIL_FOR_CODE.get(m.code)
    d = m.detail
    if expected is None:
        if d is not None:
            raise ValueError(f"error code 0x{m.code:04x} carries no detail, got {type(d).__name__}")
        return
    if not isinstance(d, expected):
        raise ValueError(f"error code 0x{m.code:04x} needs a {expected.__name__} detail")
    if isinstance(d, UnavailableInfo):
        out += struct.pack(">Hii", d.consistency, d.required, d.alive)
    elif isinstance(d, WriteTimeoutInfo):
        out += struct.pack(">Hii", d.consistency, d.received, d.block_for)
        write_string(out, d.write_type)
    elif isinstance(d, ReadTimeoutInfo):
        out += struct.pack(">HiiB", d.consistency, d.received, d.block_for, 1 if d.data_present else 0)
    elif isinstance(d, ReadFailureInfo):
        out += struct.pack(
            ">HiiiB", d.consistency, d.received, d.block_for, d.num_failures, 1 if d.data_present else 0
        )
    elif isinstance(d, FunctionFailureInfo):
        write_string(out, d.keyspace)
        write_string(out, d.function)
        write_string_list(out, d.arg_types)
    elif isinstance(d, WriteFailureInfo):
        out += struct.pack(">Hiii", d.consistency, d.received, d.block_for, d.num_failures)
        write_string(out, d.write_type)
    elif isinstance(d, AlreadyExistsInfo):
        write_string(out, d.keyspace)
        write_string(out, d.table)
    elif isinstance(d, UnpreparedInfo):
        write_short_bytes(out, d.query_id)


def _read_col_specs(r: Reader, global_spec: bool, count: int) -> list[ColumnSpec]:
    if global_spec:
        keyspace = r.read_string()
        table = r.read_string()
        return [ColumnSpec(keyspace, table, r.read_string(), r.read_option()) for _ in range(count)]
    return [ColumnSpec(r.read_string(), r.read_string(), r.read_string(), r.read_option()) for _ in range(count)]


def _write_col_specs(out: bytearray, columns: list[ColumnSpec]) -> bool:
    """Write [global_table_spec] + col specs; returns whether the global spec was used."""
    global_spec = bool(columns) and all(
        c.keyspace == columns[0].keyspace and c.table == columns[0].table for c in columns
    )
    if global_spec:
        write_string(out, columns[0].keyspace)
        write_string(out, columns[0].table)
    for c in columns:
        if not global_spec:
            write_string(out, c.keyspace)
            write_string(out, c.table)
        write_string(out, c.name)
        write_option(out, c.type)
    return global_spec


def _read_rows_metadata(r: Reader) -> RowsMetadata:
    flags = r.read_int()
    count = r.read_int()
    if count < 0:
        raise CqlProtocolError(f"negative column count {count}")
    paging_state = r.read_bytes() if flags & _ROWS_HAS_MORE_PAGES else None
    if flags & _ROWS_NO_METADATA:
        return RowsMetadata(None, paging_state, count)
    columns = _read_col_specs(r, bool(flags & _ROWS_GLOBAL_TABLES_SPEC), count)
    return RowsMetadata(columns, paging_state)


def _write_rows_metadata(out: bytearray, md: RowsMetadata) -> None:
    flags = 0
    if md.paging_state is not None:
        flags |= _ROWS_HAS_MORE_PAGES
    if md.columns is None:
        flags |= _ROWS_NO_METADATA
        count = md.column_count
        specs = b""
    else:
        count = len(md.columns)
        buf = bytearray()
        if _write_col_specs(buf, md.columns):
            flags |= _ROWS_GLOBAL_TABLES_SPEC
        specs = bytes(buf)
    write_int(out, flags)
    write_int(out, count)
    if md.paging_state is not None:
        write_bytes(out, md.paging_state)
    out += specs


def _dec_result(r: Reader) -> ResultMessage:
    kind = r.read_int()
    if kind == ResultKind.VOID:
        return VoidResult()
    if kind == ResultKind.ROWS:
        md = _read_rows_metadata(r)
        nrows = r.read_int()
        ncols = md.column_count
        if nrows < 0:
            raise CqlProtocolError(f"negative row count {nrows}")
        if ncols == 0:
            if nrows > _MAX_EMPTY_ROWS:
                raise CqlProtocolError(f"implausible {nrows} rows without columns")
            return RowsResult(md, [[] for _ in range(nrows)])
        if nrows * ncols * 4 > r.remaining():
            raise CqlProtocolError(f"truncated rows: {nrows}x{ncols} cells cannot fit in {r.remaining()} bytes")
        return RowsResult(md, r.read_rows(nrows, ncols))
    if kind == ResultKind.SET_KEYSPACE:
        return SetKeyspaceResult(r.read_string())
    if kind == ResultKind.PREPARED:
        query_id = r.read_short_bytes()
        flags = r.read_int()
        count = r.read_int()
        if count < 0:
            raise CqlProtocolError(f"negative bind marker count {count}")
        pk_count = r.read_int()
        if pk_count < 0:
            raise CqlProtocolError(f"negative partition key count {pk_count}")
        pk_indexes = [r.read_short() for _ in range(pk_count)]
        columns = _read_col_specs(r, bool(flags & _ROWS_GLOBAL_TABLES_SPEC), count)
        return PreparedResult(query_id, PreparedMetadata(columns, pk_indexes), _read_rows_metadata(r))
    if kind == ResultKind.SCHEMA_CHANGE:
        return SchemaChangeResult(*_read_schema_change(r))
    raise CqlProtocolError(f"unknown RESULT kind {kind}")


_VOID_BODY: Final = struct.pack(">i", ResultKind.VOID)


def _enc_void(m: VoidResult, out: bytearray) -> None:
    out += _VOID_BODY


def _enc_rows(m: RowsResult, out: bytearray) -> None:
    write_int(out, ResultKind.ROWS)
    _write_rows_metadata(out, m.metadata)
    ncols = m.metadata.column_count
    write_int(out, len(m.rows))
    for row in m.rows:
        if len(row) != ncols:
            raise ValueError(f"row has {len(row)} cells, metadata says {ncols}")
        for cell in row:
            write_bytes(out, cell)


def _enc_set_keyspace(m: SetKeyspaceResult, out: bytearray) -> None:
    write_int(out, ResultKind.SET_KEYSPACE)
    write_string(out, m.keyspace)


def _enc_prepared(m: PreparedResult, out: bytearray) -> None:
    write_int(out, ResultKind.PREPARED)
    write_short_bytes(out, m.query_id)
    buf = bytearray()
    global_spec = _write_col_specs(buf, m.metadata.columns)
    write_int(out, _ROWS_GLOBAL_TABLES_SPEC if global_spec else 0)
    write_int(out, len(m.metadata.columns))
    write_int(out, len(m.metadata.pk_indexes))
    for index in m.metadata.pk_indexes:
        write_short(out, index)
    out += buf
    _write_rows_metadata(out, m.result_metadata)


def _read_schema_change(r: Reader) -> tuple[str, str, str, str | None, list[str] | None]:
    change_type = r.read_string()
    target = r.read_string()
    keyspace = r.read_string()
    if target == "KEYSPACE":
        return change_type, target, keyspace, None, None
    if target in ("TABLE", "TYPE"):
        return change_type, target, keyspace, r.read_string(), None
    if target in ("FUNCTION", "AGGREGATE"):
        return change_type, target, keyspace, r.read_string(), r.read_string_list()
    raise CqlProtocolError(f"unknown schema change target {target!r}")


def _write_schema_change(out: bytearray, m: SchemaChangeResult | SchemaChangeEvent) -> None:
    write_string(out, m.change_type)
    write_string(out, m.target)
    write_string(out, m.keyspace)
    if m.target == "KEYSPACE":
        return
    if m.name is None:
        raise ValueError(f"schema change on {m.target} needs a name")
    write_string(out, m.name)
    if m.target in ("FUNCTION", "AGGREGATE"):
        write_string_list(out, m.arg_types or [])


def _enc_schema_change_result(m: SchemaChangeResult, out: bytearray) -> None:
    write_int(out, ResultKind.SCHEMA_CHANGE)
    _write_schema_change(out, m)


def _dec_event(r: Reader) -> EventMessage:
    event_type = r.read_string()
    if event_type == "TOPOLOGY_CHANGE":
        change = r.read_string()
        host, port = r.read_inet()
        return TopologyChangeEvent(change, host, port)
    if event_type == "STATUS_CHANGE":
        change = r.read_string()
        host, port = r.read_inet()
        return StatusChangeEvent(change, host, port)
    if event_type == "SCHEMA_CHANGE":
        return SchemaChangeEvent(*_read_schema_change(r))
    raise CqlProtocolError(f"unknown event type {event_type!r}")


def _enc_node_event(m: TopologyChangeEvent | StatusChangeEvent, out: bytearray) -> None:
    write_string(out, m.event_type)
    write_string(out, m.change)
    write_inet(out, (m.address, m.port))


def _enc_schema_change_event(m: SchemaChangeEvent, out: bytearray) -> None:
    write_string(out, m.event_type)
    _write_schema_change(out, m)


def _dec_ready(r: Reader) -> Ready:
    return Ready()


def _dec_authenticate(r: Reader) -> Authenticate:
    return Authenticate(r.read_string())


def _enc_authenticate(m: Authenticate, out: bytearray) -> None:
    write_string(out, m.authenticator)


def _dec_supported(r: Reader) -> Supported:
    return Supported(r.read_string_multimap())


def _enc_supported(m: Supported, out: bytearray) -> None:
    write_string_multimap(out, m.options)


def _dec_auth_challenge(r: Reader) -> AuthChallenge:
    return AuthChallenge(r.read_bytes())


def _dec_auth_success(r: Reader) -> AuthSuccess:
    return AuthSuccess(r.read_bytes())


def _enc_token(m: AuthChallenge | AuthSuccess, out: bytearray) -> None:
    write_bytes(out, m.token)


_RESPONSE_DECODERS: Final[dict[int, Callable[[Reader], ResponseMessage]]] = {
    Opcode.ERROR: _dec_error,
    Opcode.READY: _dec_ready,
    Opcode.AUTHENTICATE: _dec_authenticate,
    Opcode.SUPPORTED: _dec_supported,
    Opcode.RESULT: _dec_result,
    Opcode.EVENT: _dec_event,
    Opcode.AUTH_CHALLENGE: _dec_auth_challenge,
    Opcode.AUTH_SUCCESS: _dec_auth_success,
}

_RESPONSE_ENCODERS: Final[dict[type, Callable[[Any, bytearray], None]]] = {
    Error: _enc_error,
    Ready: _enc_empty,
    Authenticate: _enc_authenticate,
    Supported: _enc_supported,
    VoidResult: _enc_void,
    RowsResult: _enc_rows,
    SetKeyspaceResult: _enc_set_keyspace,
    PreparedResult: _enc_prepared,
    SchemaChangeResult: _enc_schema_change_result,
    TopologyChangeEvent: _enc_node_event,
    StatusChangeEvent: _enc_node_event,
    SchemaChangeEvent: _enc_schema_change_event,
    AuthChallenge: _enc_token,
    AuthSuccess: _enc_token,
}

# --------------------------------------------------------------------------- public entry points


def _bad_opcode(opcode: int, expected: str, other_direction: Mapping[int, object]) -> CqlProtocolError:
    """Cassandra's wording for an opcode that is unknown or belongs to the other direction."""
    if opcode in other_direction:
        got = "RESPONSE" if expected == "REQUEST" else "REQUEST"
        return CqlProtocolError(f"Wrong protocol direction (expected {expected}, got {got}) for opcode {opcode}")
    return CqlProtocolError(f"Unknown opcode {opcode}")


def decode_request_body(opcode: int, body: bytes | bytearray | memoryview) -> RequestMessage:
    """Parse a request body (no envelope prefix) by opcode."""
    decoder = _REQUEST_DECODERS.get(opcode)
    if decoder is None:
        raise _bad_opcode(opcode, "REQUEST", _RESPONSE_DECODERS)
    return decoder(Reader(body))


def decode_response_body(opcode: int, body: bytes | bytearray | memoryview) -> ResponseMessage:
    """Parse a response body (no envelope prefix) by opcode."""
    decoder = _RESPONSE_DECODERS.get(opcode)
    if decoder is None:
        raise _bad_opcode(opcode, "RESPONSE", _REQUEST_DECODERS)
    return decoder(Reader(body))


def decode_request(frame: Frame) -> Request:
    """Decode a (decompressed) request frame; errors carry ``frame.stream`` for the ERROR reply."""
    try:
        if frame.version & 0x80:
            raise CqlProtocolError("Wrong protocol direction (expected REQUEST, got RESPONSE)")
        decoder = _REQUEST_DECODERS.get(frame.opcode)
        if decoder is None:
            raise _bad_opcode(frame.opcode, "REQUEST", _RESPONSE_DECODERS)
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
        decoder = _RESPONSE_DECODERS.get(frame.opcode)
        if decoder is None:
            raise _bad_opcode(frame.opcode, "RESPONSE", _REQUEST_DECODERS)
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
    encoder = _REQUEST_ENCODERS.get(type(message))
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
        return _VOID_BODY
    encoder = _RESPONSE_ENCODERS.get(type(message))
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
