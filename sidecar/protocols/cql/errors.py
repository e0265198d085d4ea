"""ERROR responses of native protocol v4: codes, the per-code detail structs, and their codec.

Decoding raises only :class:`~.types.CqlProtocolError`; encoding raises ``ValueError`` when
a code and its detail do not match.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import ClassVar, Final, TypeAlias

import msgspec

from .frames import (
    Opcode,
)
from .types import Consistency
from .wire import (
    Reader,
    write_int,
    write_short_bytes,
    write_string,
    write_string_list,
)


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



# --------------------------------------------------------------------------- response codecs


def decode_error(r: Reader) -> Error:
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


def encode_error(m: Error, out: bytearray) -> None:
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
