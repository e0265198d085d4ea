"""CQL data types as the v4 wire carries them, and the protocol's shared enums and error.

:class:`DataType` is what an [option] says (rows and prepared metadata); its CQL
spelling (``map<text, frozen<list<int>>>``, as ``system_schema`` stores it) is
parsed here too: the driver's ``cqltype_to_python`` rewrites it into a Python
literal for ``ast.literal_eval`` (no custom types, no arity checks, no user types
resolved).  The wire primitives are in :mod:`.wire`; values are (de)serialized
with the driver's codecs in :mod:`.values`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum, IntEnum
from typing import Final, Literal, TypeAlias

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
    "TypeId",
    "Unset",
    "Value",
    "quote_identifier",
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

MAX_TYPE_DEPTH: Final = 32  # nesting bound for type options, so garbage cannot blow the stack


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
            return NATIVES[native]
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


NATIVES: Final[dict[int, DataType]] = {tid: DataType(tid) for tid in _NATIVE_NAMES}

ASCII: Final = NATIVES[0x01]
BIGINT: Final = NATIVES[0x02]
BLOB: Final = NATIVES[0x03]
BOOLEAN: Final = NATIVES[0x04]
COUNTER: Final = NATIVES[0x05]
DECIMAL: Final = NATIVES[0x06]
DOUBLE: Final = NATIVES[0x07]
FLOAT: Final = NATIVES[0x08]
INT: Final = NATIVES[0x09]
TIMESTAMP: Final = NATIVES[0x0B]
UUID: Final = NATIVES[0x0C]
TEXT: Final = NATIVES[0x0D]
VARCHAR: Final = TEXT
VARINT: Final = NATIVES[0x0E]
TIMEUUID: Final = NATIVES[0x0F]
INET: Final = NATIVES[0x10]
DATE: Final = NATIVES[0x11]
TIME: Final = NATIVES[0x12]
SMALLINT: Final = NATIVES[0x13]
TINYINT: Final = NATIVES[0x14]
DURATION: Final = DataType(TypeId.CUSTOM, custom=DURATION_CLASS)
