"""Native protocol v4 requests (app -> sidecar -> Cassandra): typed structs and their body codecs.

The sidecar decodes requests from apps and encodes its own towards Cassandra.
Decoders raise only :class:`~.types.CqlProtocolError`; encoders raise
``ValueError``/``TypeError`` on structs that cannot be represented.  Frames,
envelopes and dispatch by opcode are in :mod:`.messages`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

import msgspec

from .frames import (
    Opcode,
)
from .types import CqlProtocolError, Value
from .wire import (
    Reader,
    write_bytes,
    write_int,
    write_long,
    write_long_string,
    write_short,
    write_short_bytes,
    write_string,
    write_string_list,
    write_string_map,
    write_value,
)


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


REQUEST_DECODERS: Final[dict[int, Callable[[Reader], RequestMessage]]] = {
    Opcode.STARTUP: _dec_startup,
    Opcode.AUTH_RESPONSE: _dec_auth_response,
    Opcode.OPTIONS: _dec_options,
    Opcode.QUERY: _dec_query,
    Opcode.PREPARE: _dec_prepare,
    Opcode.EXECUTE: _dec_execute,
    Opcode.BATCH: _dec_batch,
    Opcode.REGISTER: _dec_register,
}

REQUEST_ENCODERS: Final[dict[type, Callable[[Any, bytearray], None]]] = {
    Startup: _enc_startup,
    AuthResponse: _enc_auth_response,
    Options: _enc_empty,
    Query: _enc_query,
    Prepare: _enc_prepare,
    Execute: _enc_execute,
    Batch: _enc_batch,
    Register: _enc_register,
}
