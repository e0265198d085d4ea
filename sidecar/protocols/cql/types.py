"""Wire primitives, CQL data type options and value codecs for native protocol v4.

Everything the codec reads off the wire goes through :class:`Reader`, which turns
every truncation and every kind of garbage into the one exception type
:class:`CqlProtocolError`, so the proxy answers ``ERROR ProtocolError`` instead of
losing a connection task to an ``IndexError`` or ``struct.error``.

Writers append to a ``bytearray``; they raise ``ValueError``/``TypeError`` (or
``struct.error`` for out-of-range integers) on bad input, since input to a
writer is the program's own data, not the peer's.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import ipaddress
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from enum import Enum, IntEnum
from typing import Any, Final, Literal, TypeAlias

import msgspec

__all__ = [
    "ASCII",
    "BIGINT",
    "BLOB",
    "BOOLEAN",
    "COUNTER",
    "DATE",
    "DECIMAL",
    "DOUBLE",
    "DURATION",
    "DURATION_CLASS",
    "FLOAT",
    "INET",
    "INT",
    "SMALLINT",
    "TEXT",
    "TIME",
    "TIMESTAMP",
    "TIMEUUID",
    "TINYINT",
    "UNSET",
    "UUID",
    "VARCHAR",
    "VARINT",
    "Consistency",
    "CqlProtocolError",
    "DataType",
    "Duration",
    "Reader",
    "TypeId",
    "Unset",
    "Value",
    "decode_value",
    "encode_value",
    "quote_identifier",
    "write_byte",
    "write_bytes",
    "write_bytes_map",
    "write_consistency",
    "write_inet",
    "write_int",
    "write_long",
    "write_long_string",
    "write_option",
    "write_option_list",
    "write_short",
    "write_short_bytes",
    "write_string",
    "write_string_list",
    "write_string_map",
    "write_string_multimap",
    "write_uuid",
    "write_value",
]

PROTOCOL_ERROR_CODE: Final = 0x000A


class CqlProtocolError(ValueError):
    """Malformed, truncated or unsupported wire data.

    ``stream`` is the offending frame's stream id when known, so a server can
    answer on it; ``code`` is the ERROR code to answer with; ``fatal`` means the
    framing itself is lost and the connection must be closed after answering.
    """

    def __init__(
        self, message: str, *, stream: int | None = None, code: int = PROTOCOL_ERROR_CODE, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stream = stream
        self.code = code
        self.fatal = fatal


class Consistency(IntEnum):
    """[consistency] values; decoded messages carry plain ints that compare equal to these."""

    ANY = 0x0000
    ONE = 0x0001
    TWO = 0x0002
    THREE = 0x0003
    QUORUM = 0x0004
    ALL = 0x0005
    LOCAL_QUORUM = 0x0006
    EACH_QUORUM = 0x0007
    SERIAL = 0x0008
    LOCAL_SERIAL = 0x0009
    LOCAL_ONE = 0x000A


class Unset(Enum):
    """The [value] "not set" marker (length -2): leaves the bound column untouched."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET
Value: TypeAlias = bytes | Literal[Unset.UNSET] | None

_BYTE = struct.Struct(">B")
_SHORT = struct.Struct(">H")
_SSHORT = struct.Struct(">h")
_INT = struct.Struct(">i")
_UINT = struct.Struct(">I")
_LONG = struct.Struct(">q")
_TINY = struct.Struct(">b")
_FLOAT = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")

MAX_TYPE_DEPTH: Final = 32  # nesting bound for type options, so garbage cannot blow the stack

_NULL_BYTES: Final = b"\xff\xff\xff\xff"
_UNSET_BYTES: Final = b"\xff\xff\xff\xfe"


# --------------------------------------------------------------------------- data types


class TypeId(IntEnum):
    """[option] ids for CQL data types (spec section 4.2.5.2; DURATION is the v5 id)."""

    CUSTOM = 0x0000
    ASCII = 0x0001
    BIGINT = 0x0002
    BLOB = 0x0003
    BOOLEAN = 0x0004
    COUNTER = 0x0005
    DECIMAL = 0x0006
    DOUBLE = 0x0007
    FLOAT = 0x0008
    INT = 0x0009
    TEXT = 0x000A  # legacy v1/v2 id, still understood
    TIMESTAMP = 0x000B
    UUID = 0x000C
    VARCHAR = 0x000D
    VARINT = 0x000E
    TIMEUUID = 0x000F
    INET = 0x0010
    DATE = 0x0011
    TIME = 0x0012
    SMALLINT = 0x0013
    TINYINT = 0x0014
    DURATION = 0x0015
    LIST = 0x0020
    MAP = 0x0021
    SET = 0x0022
    UDT = 0x0030
    TUPLE = 0x0031


DURATION_CLASS: Final = "org.apache.cassandra.db.marshal.DurationType"

_NATIVE_NAMES: Final[dict[int, str]] = {
    0x01: "ascii",
    0x02: "bigint",
    0x03: "blob",
    0x04: "boolean",
    0x05: "counter",
    0x06: "decimal",
    0x07: "double",
    0x08: "float",
    0x09: "int",
    0x0A: "text",
    0x0B: "timestamp",
    0x0C: "uuid",
    0x0D: "text",
    0x0E: "varint",
    0x0F: "timeuuid",
    0x10: "inet",
    0x11: "date",
    0x12: "time",
    0x13: "smallint",
    0x14: "tinyint",
    0x15: "duration",
}

_IDENT_RE = re.compile(r"[a-z][a-z0-9_]*\Z")


# reserved CQL keywords plus type names: bare, these would parse as something else
_RESERVED: Final = frozenset(
    {
        "add", "allow", "alter", "and", "apply", "asc", "authorize", "batch", "begin", "by", "columnfamily",
        "create", "default", "delete", "desc", "describe", "drop", "entries", "execute", "from", "full", "grant",
        "if", "in", "index", "infinity", "insert", "into", "is", "keyspace", "limit", "materialized", "mbean",
        "mbeans", "modify", "nan", "norecursive", "not", "null", "of", "on", "or", "order", "primary", "rename",
        "replace", "revoke", "schema", "select", "set", "table", "to", "token", "truncate", "unlogged", "unset",
        "update", "use", "using", "view", "where", "with", "frozen", "list", "map", "tuple", "duration",
    }
) | frozenset(_NATIVE_NAMES.values()) | {"varchar"}


def quote_identifier(name: str) -> str:
    """Render ``name`` as CQL: bare when it survives case folding and is no keyword, else double-quoted."""
    if _IDENT_RE.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


class DataType(msgspec.Struct, frozen=True):
    """A CQL type as carried by an [option]: native id, or a parameterised collection/UDT/tuple.

    ``params`` holds element types (list/set: 1, map: key+value, tuple: n, UDT:
    field types), ``fields`` the UDT field names, ``custom`` the Java class of a
    custom type.  In protocol v4 ``duration`` travels as the custom type
    :data:`DURATION_CLASS`; the v5 id 0x15 is understood as well.
    """

    type_id: int
    params: tuple[DataType, ...] = ()
    custom: str | None = None
    keyspace: str | None = None
    name: str | None = None
    fields: tuple[str, ...] = ()

    @classmethod
    def list_of(cls, element: DataType) -> DataType:
        return cls(TypeId.LIST, (element,))

    @classmethod
    def set_of(cls, element: DataType) -> DataType:
        return cls(TypeId.SET, (element,))

    @classmethod
    def map_of(cls, key: DataType, value: DataType) -> DataType:
        return cls(TypeId.MAP, (key, value))

    @classmethod
    def tuple_of(cls, *elements: DataType) -> DataType:
        return cls(TypeId.TUPLE, tuple(elements))

    @classmethod
    def udt(cls, keyspace: str, name: str, fields: Iterable[tuple[str, DataType]]) -> DataType:
        pairs = list(fields)
        return cls(
            TypeId.UDT,
            tuple(t for _, t in pairs),
            keyspace=keyspace,
            name=name,
            fields=tuple(n for n, _ in pairs),
        )

    @classmethod
    def custom_type(cls, class_name: str) -> DataType:
        return cls(TypeId.CUSTOM, custom=class_name)

    @property
    def is_duration(self) -> bool:
        return self.type_id == TypeId.DURATION or (
            self.type_id == TypeId.CUSTOM and self.custom == DURATION_CLASS
        )

    def cql_name(self) -> str:
        """CQL spelling, e.g. ``map<text, frozen<list<int>>>`` (nested complex types are frozen)."""
        return _cql_name(self, nested=False)

    def __str__(self) -> str:
        return self.cql_name()

    @classmethod
    def from_cql_name(cls, text: str, udts: Mapping[str, DataType] | None = None) -> DataType:
        """Parse a CQL type string; user types resolve through ``udts`` (keyed by name or ``ks.name``).

        Raises ``ValueError`` on anything it cannot parse.
        """
        return _TypeNameParser(text, udts or {}).parse()


def _cql_name(dt: DataType, nested: bool) -> str:
    tid = dt.type_id
    if tid == TypeId.CUSTOM:
        if dt.custom == DURATION_CLASS:
            return "duration"
        return "'" + (dt.custom or "").replace("'", "''") + "'"
    native = _NATIVE_NAMES.get(tid)
    if native is not None:
        return native
    if tid == TypeId.LIST or tid == TypeId.SET:
        inner = f"{'list' if tid == TypeId.LIST else 'set'}<{_cql_name(dt.params[0], True)}>"
    elif tid == TypeId.MAP:
        inner = f"map<{_cql_name(dt.params[0], True)}, {_cql_name(dt.params[1], True)}>"
    elif tid == TypeId.TUPLE:
        inner = "tuple<" + ", ".join(_cql_name(p, True) for p in dt.params) + ">"
    elif tid == TypeId.UDT:
        inner = quote_identifier(dt.name or "")
    else:
        return f"'unknown type 0x{tid:04x}'"
    return f"frozen<{inner}>" if nested else inner


_NATIVE_BY_NAME: Final[dict[str, int]] = {
    name: tid for tid, name in _NATIVE_NAMES.items() if tid not in (0x0A, 0x15)
} | {"varchar": 0x0D}

_TYPE_TOKEN_RE = re.compile(
    r"""\s*(?:(?P<q>"(?:[^"]|"")*")|(?P<s>'(?:[^']|'')*')|(?P<w>[A-Za-z_][A-Za-z0-9_]*)|(?P<p>[<>,.]))"""
)


class _TypeNameParser:
    """Recursive-descent parser for CQL type strings (``frozen<map<text, list<int>>>``)."""

    def __init__(self, text: str, udts: Mapping[str, DataType]) -> None:
        self.udts = udts
        self.toks: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TYPE_TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"cannot parse CQL type {text!r} at offset {pos}")
            pos = m.end()
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
        self.i = 0
        self.text = text

    def _next(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ValueError(f"unexpected end of CQL type {self.text!r}")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def _expect(self, punct: str) -> None:
        kind, val = self._next()
        if kind != "p" or val != punct:
            raise ValueError(f"expected {punct!r} in CQL type {self.text!r}, got {val!r}")

    def _peek(self, punct: str) -> bool:
        return self.i < len(self.toks) and self.toks[self.i] == ("p", punct)

    def parse(self) -> DataType:
        dt = self._type(0)
        if self.i != len(self.toks):
            raise ValueError(f"trailing input in CQL type {self.text!r}")
        return dt

    def _type(self, depth: int) -> DataType:
        if depth > MAX_TYPE_DEPTH:
            raise ValueError("CQL type nested too deeply")
        kind, val = self._next()
        if kind == "s":
            cls_name = val[1:-1].replace("''", "'")
            return DataType(TypeId.CUSTOM, custom=cls_name)
        if kind == "q":
            return self._udt(val[1:-1].replace('""', '"'))
        if kind != "w":
            raise ValueError(f"unexpected {val!r} in CQL type {self.text!r}")
        word = val.lower()
        if word == "frozen":
            self._expect("<")
            inner = self._type(depth + 1)
            self._expect(">")
            return inner
        if word in ("list", "set") and self._peek("<"):
            self._expect("<")
            elem = self._type(depth + 1)
            self._expect(">")
            return DataType(TypeId.LIST if word == "list" else TypeId.SET, (elem,))
        if word == "map" and self._peek("<"):
            self._expect("<")
            key = self._type(depth + 1)
            self._expect(",")
            value = self._type(depth + 1)
            self._expect(">")
            return DataType(TypeId.MAP, (key, value))
        if word == "tuple" and self._peek("<"):
            self._expect("<")
            elems = [self._type(depth + 1)]
            while self._peek(","):
                self._expect(",")
                elems.append(self._type(depth + 1))
            self._expect(">")
            return DataType(TypeId.TUPLE, tuple(elems))
        if word == "duration" and not self._peek("."):
            return DURATION
        native = _NATIVE_BY_NAME.get(word)
        if native is not None and not self._peek("."):
            return _NATIVES[native]
        return self._udt(word)

    def _udt(self, name: str) -> DataType:
        keyspace = None
        if self._peek("."):
            self._expect(".")
            kind, val = self._next()
            if kind == "q":
                keyspace, name = name, val[1:-1].replace('""', '"')
            elif kind == "w":
                keyspace, name = name, val.lower()
            else:
                raise ValueError(f"bad user type name in {self.text!r}")
        found = None
        if keyspace is not None:
            found = self.udts.get(f"{keyspace}.{name}")
        if found is None:
            found = self.udts.get(name)
        if found is None:
            raise ValueError(f"unknown CQL type {name!r} (not a native type and not in the given UDTs)")
        return found


_NATIVES: Final[dict[int, DataType]] = {tid: DataType(tid) for tid in _NATIVE_NAMES}

ASCII: Final = _NATIVES[0x01]
BIGINT: Final = _NATIVES[0x02]
BLOB: Final = _NATIVES[0x03]
BOOLEAN: Final = _NATIVES[0x04]
COUNTER: Final = _NATIVES[0x05]
DECIMAL: Final = _NATIVES[0x06]
DOUBLE: Final = _NATIVES[0x07]
FLOAT: Final = _NATIVES[0x08]
INT: Final = _NATIVES[0x09]
TIMESTAMP: Final = _NATIVES[0x0B]
UUID: Final = _NATIVES[0x0C]
TEXT: Final = _NATIVES[0x0D]
VARCHAR: Final = TEXT
VARINT: Final = _NATIVES[0x0E]
TIMEUUID: Final = _NATIVES[0x0F]
INET: Final = _NATIVES[0x10]
DATE: Final = _NATIVES[0x11]
TIME: Final = _NATIVES[0x12]
SMALLINT: Final = _NATIVES[0x13]
TINYINT: Final = _NATIVES[0x14]
DURATION: Final = DataType(TypeId.CUSTOM, custom=DURATION_CLASS)


# --------------------------------------------------------------------------- reader


def _truncated(what: str, need: int, pos: int, have: int) -> CqlProtocolError:
    return CqlProtocolError(f"truncated {what}: need {need} bytes at offset {pos}, {max(have, 0)} left")


class Reader:
    """A cursor over a memoryview: every ``read_*`` consumes one protocol primitive.

    Bounds are checked before slicing and ``struct.error`` is translated, so the
    only exception that escapes is :class:`CqlProtocolError`.
    """

    __slots__ = ("buf", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        buf = data if isinstance(data, memoryview) else memoryview(data)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        self.buf = buf
        self.end = len(buf)
        self.pos = pos

    def remaining(self) -> int:
        return self.end - self.pos

    def rest(self) -> bytes:
        """Everything not yet consumed (e.g. a body behind an envelope prefix)."""
        out = bytes(self.buf[self.pos :])
        self.pos = self.end
        return out

    def read_byte(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise _truncated("[byte]", 1, pos, 0)
        self.pos = pos + 1
        return self.buf[pos]

    def read_short(self) -> int:
        try:
            (v,) = _SHORT.unpack_from(self.buf, self.pos)
        except struct.error:
            raise _truncated("[short]", 2, self.pos, self.end - self.pos) from None
        self.pos += 2
        return v

    def read_int(self) -> int:
        try:
            (v,) = _INT.unpack_from(self.buf, self.pos)
        except struct.error:
            raise _truncated("[int]", 4, self.pos, self.end - self.pos) from None
        self.pos += 4
        return v

    def read_long(self) -> int:
        try:
            (v,) = _LONG.unpack_from(self.buf, self.pos)
        except struct.error:
            raise _truncated("[long]", 8, self.pos, self.end - self.pos) from None
        self.pos += 8
        return v

    def read_raw(self, n: int, what: str = "bytes") -> bytes:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.end:
            raise _truncated(what, n, pos, self.end - pos)
        self.pos = end
        return bytes(self.buf[pos:end])

    def _utf8(self, n: int, what: str) -> str:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.end:
            raise _truncated(what, n, pos, self.end - pos)
        self.pos = end
        try:
            return str(self.buf[pos:end], "utf-8")
        except UnicodeDecodeError:
            raise CqlProtocolError(f"invalid UTF-8 in {what} at offset {pos}") from None

    def read_string(self) -> str:
        return self._utf8(self.read_short(), "[string]")

    def read_long_string(self) -> str:
        return self._utf8(self.read_int(), "[long string]")

    def read_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.read_raw(16, "[uuid]"))

    def read_string_list(self) -> list[str]:
        return [self.read_string() for _ in range(self.read_short())]

    def read_bytes(self) -> bytes | None:
        n = self.read_int()
        if n < 0:
            return None
        return self.read_raw(n, "[bytes]")

    def read_value(self) -> Value:
        n = self.read_int()
        if n >= 0:
            return self.read_raw(n, "[value]")
        if n == -1:
            return None
        if n == -2:
            return UNSET
        raise CqlProtocolError(f"invalid [value] length {n}")

    def read_values(self, n: int) -> list[Value]:
        """``n`` consecutive [value]s; the per-value hot loop of QUERY/EXECUTE, kept in locals."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _INT.unpack_from
        out: list[Value] = []
        append = out.append
        for _ in range(n):
            if pos + 4 > end:
                raise _truncated("[value]", 4, pos, end - pos)
            (size,) = unpack(buf, pos)
            pos += 4
            if size >= 0:
                nxt = pos + size
                if nxt > end:
                    raise _truncated("[value]", size, pos, end - pos)
                append(buf[pos:nxt].tobytes())
                pos = nxt
            elif size == -1:
                append(None)
            elif size == -2:
                append(UNSET)
            else:
                raise CqlProtocolError(f"invalid [value] length {size}")
        self.pos = pos
        return out

    def read_rows(self, nrows: int, ncols: int) -> list[list[bytes | None]]:
        """``nrows`` x ``ncols`` [bytes] cells of a Rows result, kept in locals for speed."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack = _INT.unpack_from
        rows: list[list[bytes | None]] = []
        for _ in range(nrows):
            row: list[bytes | None] = []
            append = row.append
            for _ in range(ncols):
                if pos + 4 > end:
                    raise _truncated("[bytes]", 4, pos, end - pos)
                (size,) = unpack(buf, pos)
                pos += 4
                if size < 0:
                    append(None)
                    continue
                nxt = pos + size
                if nxt > end:
                    raise _truncated("[bytes]", size, pos, end - pos)
                append(buf[pos:nxt].tobytes())
                pos = nxt
            rows.append(row)
        self.pos = pos
        return rows

    def read_short_bytes(self) -> bytes:
        return self.read_raw(self.read_short(), "[short bytes]")

    def read_inet(self) -> tuple[str, int]:
        size = self.read_byte()
        if size not in (4, 16):
            raise CqlProtocolError(f"invalid [inet] address size {size}")
        addr = ipaddress.ip_address(self.read_raw(size, "[inet]"))
        return str(addr), self.read_int()

    def read_consistency(self) -> int:
        return self.read_short()

    def read_string_map(self) -> dict[str, str]:
        return {self.read_string(): self.read_string() for _ in range(self.read_short())}

    def read_string_multimap(self) -> dict[str, list[str]]:
        return {self.read_string(): self.read_string_list() for _ in range(self.read_short())}

    def read_bytes_map(self) -> dict[str, bytes | None]:
        return {self.read_string(): self.read_bytes() for _ in range(self.read_short())}

    def read_option(self) -> DataType:
        return self._option(0)

    def read_option_list(self) -> list[DataType]:
        return [self._option(0) for _ in range(self.read_short())]

    def _option(self, depth: int) -> DataType:
        tid = self.read_short()
        native = _NATIVES.get(tid)
        if native is not None:
            return native
        if depth >= MAX_TYPE_DEPTH:
            raise CqlProtocolError("type [option] nested too deeply")
        if tid == TypeId.CUSTOM:
            cls_name = self.read_string()
            return DURATION if cls_name == DURATION_CLASS else DataType(TypeId.CUSTOM, custom=cls_name)
        if tid == TypeId.LIST or tid == TypeId.SET:
            return DataType(tid, (self._option(depth + 1),))
        if tid == TypeId.MAP:
            key = self._option(depth + 1)
            return DataType(tid, (key, self._option(depth + 1)))
        if tid == TypeId.UDT:
            keyspace = self.read_string()
            name = self.read_string()
            names: list[str] = []
            types: list[DataType] = []
            for _ in range(self.read_short()):
                names.append(self.read_string())
                types.append(self._option(depth + 1))
            return DataType(tid, tuple(types), keyspace=keyspace, name=name, fields=tuple(names))
        if tid == TypeId.TUPLE:
            return DataType(tid, tuple(self._option(depth + 1) for _ in range(self.read_short())))
        raise CqlProtocolError(f"unknown type [option] id 0x{tid:04x}")


# --------------------------------------------------------------------------- writers


def write_byte(out: bytearray, v: int) -> None:
    out.append(v)


def write_short(out: bytearray, v: int) -> None:
    out += _SHORT.pack(v)


def write_int(out: bytearray, v: int) -> None:
    out += _INT.pack(v)


def write_long(out: bytearray, v: int) -> None:
    out += _LONG.pack(v)


def write_string(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    out += _SHORT.pack(len(b))
    out += b


def write_long_string(out: bytearray, s: str | bytes) -> None:
    b = s.encode("utf-8") if isinstance(s, str) else s
    out += _INT.pack(len(b))
    out += b


def write_uuid(out: bytearray, u: uuid.UUID) -> None:
    out += u.bytes


def write_string_list(out: bytearray, items: Iterable[str]) -> None:
    items = list(items)
    out += _SHORT.pack(len(items))
    for s in items:
        write_string(out, s)


def write_bytes(out: bytearray, b: bytes | bytearray | memoryview | None) -> None:
    if b is None:
        out += _NULL_BYTES
    else:
        out += _INT.pack(len(b))
        out += b


def write_value(out: bytearray, v: Value | bytearray | memoryview) -> None:
    if v is None:
        out += _NULL_BYTES
    elif v is UNSET:
        out += _UNSET_BYTES
    else:
        out += _INT.pack(len(v))
        out += v


def write_short_bytes(out: bytearray, b: bytes | bytearray | memoryview) -> None:
    out += _SHORT.pack(len(b))
    out += b


def write_inet(out: bytearray, address: tuple[str, int]) -> None:
    host, port = address
    packed = ipaddress.ip_address(host).packed
    out.append(len(packed))
    out += packed
    out += _INT.pack(port)


def write_consistency(out: bytearray, v: int) -> None:
    out += _SHORT.pack(v)


def write_string_map(out: bytearray, m: Mapping[str, str]) -> None:
    out += _SHORT.pack(len(m))
    for k, v in m.items():
        write_string(out, k)
        write_string(out, v)


def write_string_multimap(out: bytearray, m: Mapping[str, Iterable[str]]) -> None:
    out += _SHORT.pack(len(m))
    for k, v in m.items():
        write_string(out, k)
        write_string_list(out, v)


def write_bytes_map(out: bytearray, m: Mapping[str, bytes | None]) -> None:
    out += _SHORT.pack(len(m))
    for k, v in m.items():
        write_string(out, k)
        write_bytes(out, v)


def write_option(out: bytearray, dt: DataType) -> None:
    tid = dt.type_id
    out += _SHORT.pack(tid)
    if tid == TypeId.CUSTOM:
        write_string(out, dt.custom or "")
    elif tid == TypeId.LIST or tid == TypeId.SET:
        write_option(out, dt.params[0])
    elif tid == TypeId.MAP:
        write_option(out, dt.params[0])
        write_option(out, dt.params[1])
    elif tid == TypeId.UDT:
        write_string(out, dt.keyspace or "")
        write_string(out, dt.name or "")
        if len(dt.fields) != len(dt.params):
            raise ValueError("UDT field names and types differ in length")
        out += _SHORT.pack(len(dt.fields))
        for name, ftype in zip(dt.fields, dt.params, strict=True):
            write_string(out, name)
            write_option(out, ftype)
    elif tid == TypeId.TUPLE:
        out += _SHORT.pack(len(dt.params))
        for p in dt.params:
            write_option(out, p)


def write_option_list(out: bytearray, types: Iterable[DataType]) -> None:
    types = list(types)
    out += _SHORT.pack(len(types))
    for t in types:
        write_option(out, t)


# --------------------------------------------------------------------------- values


class Duration(msgspec.Struct, frozen=True):
    """A CQL ``duration``: kept as its three components because months/days are not fixed lengths."""

    months: int = 0
    days: int = 0
    nanoseconds: int = 0


_UTC = _dt.UTC
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_MS = _dt.timedelta(milliseconds=1)
_EPOCH_ORDINAL: Final = _dt.date(1970, 1, 1).toordinal()
_DATE_CENTER: Final = 1 << 31
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)

_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)

_Decoder = Callable[[DataType, memoryview], Any]
_Encoder = Callable[[DataType, Any], bytes]


def _fixed(data: memoryview, size: int, name: str) -> None:
    if len(data) != size:
        raise CqlProtocolError(f"{name} value must be {size} bytes, got {len(data)}")


def _dec_ascii(dt: DataType, data: memoryview) -> str:
    try:
        return str(data, "ascii")
    except UnicodeDecodeError:
        raise CqlProtocolError("non-ASCII byte in ascii value") from None


def _dec_text(dt: DataType, data: memoryview) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError:
        raise CqlProtocolError("invalid UTF-8 in text value") from None


def _dec_blob(dt: DataType, data: memoryview) -> bytes:
    return bytes(data)


def _dec_long(dt: DataType, data: memoryview) -> int:
    _fixed(data, 8, "bigint")
    return _LONG.unpack(data)[0]


def _dec_int(dt: DataType, data: memoryview) -> int:
    _fixed(data, 4, "int")
    return _INT.unpack(data)[0]


def _dec_smallint(dt: DataType, data: memoryview) -> int:
    _fixed(data, 2, "smallint")
    return _SSHORT.unpack(data)[0]


def _dec_tinyint(dt: DataType, data: memoryview) -> int:
    _fixed(data, 1, "tinyint")
    return _TINY.unpack(data)[0]


def _dec_boolean(dt: DataType, data: memoryview) -> bool:
    _fixed(data, 1, "boolean")
    return data[0] != 0


def _dec_double(dt: DataType, data: memoryview) -> float:
    _fixed(data, 8, "double")
    return _DOUBLE.unpack(data)[0]


def _dec_float(dt: DataType, data: memoryview) -> float:
    _fixed(data, 4, "float")
    return _FLOAT.unpack(data)[0]


def _dec_varint(dt: DataType, data: memoryview) -> int:
    return int.from_bytes(data, "big", signed=True)


def _dec_decimal(dt: DataType, data: memoryview) -> decimal.Decimal:
    if len(data) < 4:
        raise CqlProtocolError("decimal value shorter than its scale")
    scale = _INT.unpack_from(data)[0]
    unscaled = int.from_bytes(data[4:], "big", signed=True)
    # scaleb under an unbounded context is exact; no str round trip (int->str has a digit limit)
    return decimal.Decimal(unscaled).scaleb(-scale, _EXACT)


def _dec_timestamp(dt: DataType, data: memoryview) -> _dt.datetime | int:
    _fixed(data, 8, "timestamp")
    ms = _LONG.unpack(data)[0]
    try:
        return _EPOCH + _dt.timedelta(milliseconds=ms)
    except OverflowError:
        return ms  # outside datetime's range: keep the raw milliseconds


def _dec_uuid(dt: DataType, data: memoryview) -> uuid.UUID:
    _fixed(data, 16, "uuid")
    return uuid.UUID(bytes=bytes(data))


def _dec_inet(dt: DataType, data: memoryview) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if len(data) == 4:
        return ipaddress.IPv4Address(bytes(data))
    if len(data) == 16:
        return ipaddress.IPv6Address(bytes(data))
    raise CqlProtocolError(f"inet value must be 4 or 16 bytes, got {len(data)}")


def _dec_date(dt: DataType, data: memoryview) -> _dt.date | int:
    _fixed(data, 4, "date")
    days = _UINT.unpack(data)[0] - _DATE_CENTER
    try:
        return _dt.date.fromordinal(_EPOCH_ORDINAL + days)
    except (ValueError, OverflowError):
        return days  # outside date's range: keep the raw day offset from the epoch


def _dec_time(dt: DataType, data: memoryview) -> int:
    _fixed(data, 8, "time")
    return _LONG.unpack(data)[0]


def _read_uvint(data: memoryview, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise CqlProtocolError("truncated vint")
    first = data[pos]
    extra = 8 - ((~first) & 0xFF).bit_length()
    if extra == 0:
        return first, pos + 1
    end = pos + 1 + extra
    if end > len(data):
        raise CqlProtocolError("truncated vint")
    value = ((first & (0xFF >> extra)) << (8 * extra)) | int.from_bytes(data[pos + 1 : end], "big")
    return value, end


def _uvint(v: int) -> bytes:
    if v < 0x80:
        return bytes((v,))
    n = (v.bit_length() + 6) // 7
    if n > 8:
        return b"\xff" + v.to_bytes(8, "big")
    b = bytearray(v.to_bytes(n, "big"))
    b[0] |= (0xFF << (9 - n)) & 0xFF
    return bytes(b)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _unzigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _dec_duration(dt: DataType, data: memoryview) -> Duration:
    months, pos = _read_uvint(data, 0)
    days, pos = _read_uvint(data, pos)
    nanos, pos = _read_uvint(data, pos)
    if pos != len(data):
        raise CqlProtocolError("trailing bytes after duration value")
    return Duration(_unzigzag(months), _unzigzag(days), _unzigzag(nanos))


def _hashable(v: Any) -> Any:
    """Set elements and map keys must hash: nested collections decode to their frozen forms."""
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, set):
        return frozenset(v)
    if isinstance(v, dict):
        return tuple((k, _hashable(x)) for k, x in v.items())
    return v


def _dec_list(dt: DataType, data: memoryview) -> list[Any]:
    r = Reader(data)
    n = r.read_int()
    if n < 0:
        raise CqlProtocolError(f"negative collection size {n}")
    elem = dt.params[0]
    return [_decode(elem, r.read_bytes()) for _ in range(n)]


def _dec_set(dt: DataType, data: memoryview) -> set[Any]:
    return {_hashable(x) for x in _dec_list(dt, data)}


def _dec_map(dt: DataType, data: memoryview) -> dict[Any, Any]:
    r = Reader(data)
    n = r.read_int()
    if n < 0:
        raise CqlProtocolError(f"negative map size {n}")
    kt, vt = dt.params
    out: dict[Any, Any] = {}
    for _ in range(n):
        k = _hashable(_decode(kt, r.read_bytes()))
        out[k] = _decode(vt, r.read_bytes())
    return out


def _dec_tuple(dt: DataType, data: memoryview) -> tuple[Any, ...]:
    r = Reader(data)
    return tuple(_decode(t, r.read_bytes()) if r.remaining() else None for t in dt.params)


def _dec_udt(dt: DataType, data: memoryview) -> dict[str, Any]:
    r = Reader(data)
    return {
        name: (_decode(t, r.read_bytes()) if r.remaining() else None)
        for name, t in zip(dt.fields, dt.params, strict=False)
    }


def _dec_custom(dt: DataType, data: memoryview) -> Any:
    if dt.custom == DURATION_CLASS:
        return _dec_duration(dt, data)
    return bytes(data)


_DECODERS: Final[dict[int, _Decoder]] = {
    TypeId.CUSTOM: _dec_custom,
    TypeId.ASCII: _dec_ascii,
    TypeId.BIGINT: _dec_long,
    TypeId.BLOB: _dec_blob,
    TypeId.BOOLEAN: _dec_boolean,
    TypeId.COUNTER: _dec_long,
    TypeId.DECIMAL: _dec_decimal,
    TypeId.DOUBLE: _dec_double,
    TypeId.FLOAT: _dec_float,
    TypeId.INT: _dec_int,
    TypeId.TEXT: _dec_text,
    TypeId.TIMESTAMP: _dec_timestamp,
    TypeId.UUID: _dec_uuid,
    TypeId.VARCHAR: _dec_text,
    TypeId.VARINT: _dec_varint,
    TypeId.TIMEUUID: _dec_uuid,
    TypeId.INET: _dec_inet,
    TypeId.DATE: _dec_date,
    TypeId.TIME: _dec_time,
    TypeId.SMALLINT: _dec_smallint,
    TypeId.TINYINT: _dec_tinyint,
    TypeId.DURATION: _dec_duration,
    TypeId.LIST: _dec_list,
    TypeId.SET: _dec_set,
    TypeId.MAP: _dec_map,
    TypeId.TUPLE: _dec_tuple,
    TypeId.UDT: _dec_udt,
}

# types whose empty serialization is a real value rather than the legacy "empty" (None)
_EMPTY_IS_VALUE: Final = frozenset({TypeId.ASCII, TypeId.BLOB, TypeId.TEXT, TypeId.VARCHAR, TypeId.CUSTOM})


def _decode(dt: DataType, data: bytes | bytearray | memoryview | None) -> Any:
    if data is None:
        return None
    if not data and dt.type_id not in _EMPTY_IS_VALUE:
        return None
    fn = _DECODERS.get(dt.type_id)
    if fn is None:
        raise CqlProtocolError(f"no decoder for type id 0x{dt.type_id:04x}")
    return fn(dt, data if isinstance(data, memoryview) else memoryview(data))


def decode_value(dt: DataType, data: bytes | bytearray | memoryview | None) -> Any:
    """Deserialize one CQL value of type ``dt``; ``None`` (null) and legacy empty values give ``None``.

    Python types: ascii/text -> str, integers -> int, blob -> bytes, boolean ->
    bool, decimal -> Decimal, double/float -> float, timestamp -> aware UTC
    datetime (int ms when outside datetime's range), uuid/timeuuid -> UUID,
    inet -> IPv4Address/IPv6Address, date -> date (int days when out of range),
    time -> int nanoseconds since midnight, duration -> Duration, list -> list,
    set -> set, map -> dict, tuple -> tuple, udt -> dict by field name.  Set
    elements and map keys that are collections decode to tuples/frozensets.
    Unknown custom types give raw bytes.
    """
    try:
        return _decode(dt, data)
    except CqlProtocolError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, decimal.DecimalException) as exc:
        raise CqlProtocolError(f"malformed {dt.cql_name()} value: {exc}") from None


def _check_range(v: int, bounds: tuple[int, int], name: str) -> int:
    if not isinstance(v, int):
        raise TypeError(f"{name} value must be int, got {type(v).__name__}")
    if not bounds[0] <= v <= bounds[1]:
        raise ValueError(f"{name} value {v} out of range")
    return v


def _enc_ascii(dt: DataType, v: Any) -> bytes:
    if not isinstance(v, str):
        raise TypeError(f"ascii value must be str, got {type(v).__name__}")
    return v.encode("ascii")


def _enc_text(dt: DataType, v: Any) -> bytes:
    if not isinstance(v, str):
        raise TypeError(f"text value must be str, got {type(v).__name__}")
    return v.encode("utf-8")


def _enc_blob(dt: DataType, v: Any) -> bytes:
    if not isinstance(v, bytes | bytearray | memoryview):
        raise TypeError(f"blob value must be bytes, got {type(v).__name__}")
    return bytes(v)


def _enc_long(dt: DataType, v: Any) -> bytes:
    return _LONG.pack(_check_range(v, _INT64, "bigint"))


def _enc_int(dt: DataType, v: Any) -> bytes:
    return _INT.pack(_check_range(v, _INT32, "int"))


def _enc_smallint(dt: DataType, v: Any) -> bytes:
    return _SSHORT.pack(_check_range(v, (-(1 << 15), (1 << 15) - 1), "smallint"))


def _enc_tinyint(dt: DataType, v: Any) -> bytes:
    return _TINY.pack(_check_range(v, (-128, 127), "tinyint"))


def _enc_boolean(dt: DataType, v: Any) -> bytes:
    if not isinstance(v, int):  # bool is an int; "false" must not silently become True
        raise TypeError(f"boolean value must be bool, got {type(v).__name__}")
    return b"\x01" if v else b"\x00"


def _enc_double(dt: DataType, v: Any) -> bytes:
    return _DOUBLE.pack(float(v))


def _enc_float(dt: DataType, v: Any) -> bytes:
    return _FLOAT.pack(float(v))


def _varint_bytes(n: int) -> bytes:
    return n.to_bytes((n + (n < 0)).bit_length() // 8 + 1, "big", signed=True)


def _enc_varint(dt: DataType, v: Any) -> bytes:
    if not isinstance(v, int):
        raise TypeError(f"varint value must be int, got {type(v).__name__}")
    return _varint_bytes(v)


def _enc_decimal(dt: DataType, v: Any) -> bytes:
    if isinstance(v, float):
        v = decimal.Decimal(repr(v))
    elif not isinstance(v, decimal.Decimal):
        v = decimal.Decimal(v)
    sign, digits, exponent = v.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"decimal value {v} is not finite")
    unscaled = int(decimal.Decimal((sign, digits, 0)))
    return _INT.pack(_check_range(-exponent, _INT32, "decimal scale")) + _varint_bytes(unscaled)


def _enc_timestamp(dt: DataType, v: Any) -> bytes:
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_UTC)
        v = (v - _EPOCH) // _ONE_MS
    elif isinstance(v, _dt.date):
        v = (v.toordinal() - _EPOCH_ORDINAL) * 86_400_000
    return _LONG.pack(_check_range(v, _INT64, "timestamp"))


def _enc_uuid(dt: DataType, v: Any) -> bytes:
    if isinstance(v, str):
        v = uuid.UUID(v)
    if not isinstance(v, uuid.UUID):
        raise TypeError(f"uuid value must be UUID, got {type(v).__name__}")
    return v.bytes


def _enc_inet(dt: DataType, v: Any) -> bytes:
    return ipaddress.ip_address(v).packed


def _enc_date(dt: DataType, v: Any) -> bytes:
    if isinstance(v, _dt.datetime):
        v = v.date()
    if isinstance(v, str):
        v = _dt.date.fromisoformat(v)
    if isinstance(v, _dt.date):
        v = v.toordinal() - _EPOCH_ORDINAL
    return _UINT.pack(_check_range(v, (-_DATE_CENTER, _DATE_CENTER - 1), "date") + _DATE_CENTER)


def _enc_time(dt: DataType, v: Any) -> bytes:
    if isinstance(v, _dt.time):
        v = (((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond) * 1000
    return _LONG.pack(_check_range(v, (0, 86_399_999_999_999), "time"))


def _enc_duration(dt: DataType, v: Any) -> bytes:
    if isinstance(v, tuple):
        months, days, nanos = v
    else:
        months, days, nanos = v.months, v.days, v.nanoseconds
    return (
        _uvint(_zigzag(_check_range(months, _INT32, "duration months")))
        + _uvint(_zigzag(_check_range(days, _INT32, "duration days")))
        + _uvint(_zigzag(_check_range(nanos, _INT64, "duration nanoseconds")))
    )


def _enc_elements(elem: DataType, items: list[Any]) -> bytes:
    out = bytearray(_INT.pack(len(items)))
    for item in items:
        write_bytes(out, encode_value(elem, item))
    return bytes(out)


def _enc_list(dt: DataType, v: Any) -> bytes:
    if isinstance(v, str | bytes | Mapping):
        raise TypeError(f"{dt.cql_name()} value must be a list/set, got {type(v).__name__}")
    return _enc_elements(dt.params[0], list(v))


def _pairs(v: Any) -> list[tuple[Any, Any]]:
    return list(v.items()) if isinstance(v, Mapping) else [tuple(p) for p in v]


def _enc_map(dt: DataType, v: Any) -> bytes:
    kt, vt = dt.params
    pairs = _pairs(v)
    out = bytearray(_INT.pack(len(pairs)))
    for k, x in pairs:
        write_bytes(out, encode_value(kt, k))
        write_bytes(out, encode_value(vt, x))
    return bytes(out)


def _enc_tuple(dt: DataType, v: Any) -> bytes:
    items = list(v)
    if len(items) > len(dt.params):
        raise ValueError(f"{dt.cql_name()} takes {len(dt.params)} items, got {len(items)}")
    items += [None] * (len(dt.params) - len(items))
    out = bytearray()
    for t, item in zip(dt.params, items, strict=True):
        write_bytes(out, encode_value(t, item))
    return bytes(out)


def _enc_udt(dt: DataType, v: Any) -> bytes:
    values = dict(_pairs(v))
    unknown = set(values) - set(dt.fields)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)} for user type {dt.name}")
    out = bytearray()
    for name, t in zip(dt.fields, dt.params, strict=True):
        write_bytes(out, encode_value(t, values.get(name)))
    return bytes(out)


def _enc_custom(dt: DataType, v: Any) -> bytes:
    if dt.custom == DURATION_CLASS:
        return _enc_duration(dt, v)
    return _enc_blob(dt, v)


_ENCODERS: Final[dict[int, _Encoder]] = {
    TypeId.CUSTOM: _enc_custom,
    TypeId.ASCII: _enc_ascii,
    TypeId.BIGINT: _enc_long,
    TypeId.BLOB: _enc_blob,
    TypeId.BOOLEAN: _enc_boolean,
    TypeId.COUNTER: _enc_long,
    TypeId.DECIMAL: _enc_decimal,
    TypeId.DOUBLE: _enc_double,
    TypeId.FLOAT: _enc_float,
    TypeId.INT: _enc_int,
    TypeId.TEXT: _enc_text,
    TypeId.TIMESTAMP: _enc_timestamp,
    TypeId.UUID: _enc_uuid,
    TypeId.VARCHAR: _enc_text,
    TypeId.VARINT: _enc_varint,
    TypeId.TIMEUUID: _enc_uuid,
    TypeId.INET: _enc_inet,
    TypeId.DATE: _enc_date,
    TypeId.TIME: _enc_time,
    TypeId.SMALLINT: _enc_smallint,
    TypeId.TINYINT: _enc_tinyint,
    TypeId.DURATION: _enc_duration,
    TypeId.LIST: _enc_list,
    TypeId.SET: _enc_list,
    TypeId.MAP: _enc_map,
    TypeId.TUPLE: _enc_tuple,
    TypeId.UDT: _enc_udt,
}


def encode_value(dt: DataType, value: Any) -> bytes | None:
    """Serialize ``value`` as CQL type ``dt``; ``None`` stays ``None`` (a null [bytes]).

    Accepts what :func:`decode_value` returns, plus convenient inputs: naive
    datetimes (taken as UTC) or int ms for timestamp, ``date``/int days/ISO str
    for date, ``time``/int ns for time, str for uuid/inet, ``(months, days,
    ns)`` for duration, any mapping or pair sequence for map/udt.  Raises
    ``TypeError``/``ValueError`` on values that do not fit the type.
    """
    if value is None:
        return None
    fn = _ENCODERS.get(dt.type_id)
    if fn is None:
        raise ValueError(f"no encoder for type id 0x{dt.type_id:04x}")
    try:
        return fn(dt, value)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot encode {value!r} as {dt.cql_name()}: {exc}") from None
