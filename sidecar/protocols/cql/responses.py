"""Native protocol v4 responses other than ERROR (Cassandra -> sidecar -> app): structs and body codecs.

The sidecar decodes Cassandra's answers and encodes its own (RESULT Void for a
journaled write, system-table rows, READY, SUPPORTED ...).  ERROR is in
:mod:`.errors`; envelopes and dispatch by opcode are in :mod:`.messages`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

import msgspec

from .errors import Error, decode_error, encode_error
from .frames import (
    Opcode,
)
from .types import CqlProtocolError, DataType
from .wire import (
    Reader,
    write_bytes,
    write_inet,
    write_int,
    write_option,
    write_short,
    write_short_bytes,
    write_string,
    write_string_list,
    write_string_multimap,
)


class ResultKind(IntEnum):
    VOID = 0x0001
    ROWS = 0x0002
    SET_KEYSPACE = 0x0003
    PREPARED = 0x0004
    SCHEMA_CHANGE = 0x0005



_ROWS_GLOBAL_TABLES_SPEC: Final = 0x0001
_ROWS_HAS_MORE_PAGES: Final = 0x0002
_ROWS_NO_METADATA: Final = 0x0004
_MAX_EMPTY_ROWS: Final = 1 << 16  # zero-column rows cost no bytes; bound them so garbage cannot allocate GBs


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


VOID_BODY: Final = struct.pack(">i", ResultKind.VOID)


def _enc_void(m: VoidResult, out: bytearray) -> None:
    out += VOID_BODY


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


def _enc_ready(m: Ready, out: bytearray) -> None:
    pass  # READY has an empty body


def _enc_token(m: AuthChallenge | AuthSuccess, out: bytearray) -> None:
    write_bytes(out, m.token)


RESPONSE_DECODERS: Final[dict[int, Callable[[Reader], ResponseMessage]]] = {
    Opcode.ERROR: decode_error,
    Opcode.READY: _dec_ready,
    Opcode.AUTHENTICATE: _dec_authenticate,
    Opcode.SUPPORTED: _dec_supported,
    Opcode.RESULT: _dec_result,
    Opcode.EVENT: _dec_event,
    Opcode.AUTH_CHALLENGE: _dec_auth_challenge,
    Opcode.AUTH_SUCCESS: _dec_auth_success,
}

RESPONSE_ENCODERS: Final[dict[type, Callable[[Any, bytearray], None]]] = {
    Error: encode_error,
    Ready: _enc_ready,
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
