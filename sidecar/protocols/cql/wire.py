"""Wire primitives of native protocol v4: the [short]/[int]/[string]/[bytes]/[option]... notations.

Everything the codec reads off the wire goes through :class:`Reader`, which turns
every truncation and every kind of garbage into the one exception type
:class:`~.types.CqlProtocolError`, so the proxy answers ``ERROR ProtocolError`` instead of
losing a connection task to an ``IndexError`` or ``struct.error``.

Writers append to a ``bytearray``; they raise ``ValueError``/``TypeError`` (or
``struct.error`` for out-of-range integers) on bad input, since input to a
writer is the program's own data, not the peer's.

Hand-written rather than the driver's ``cassandra.marshal``: this is the hot
path (every frame of every request and response), it reads from a memoryview
without copies, and it must turn garbage into one exception type.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from collections.abc import Iterable, Mapping
from typing import Final

from .types import (
    DURATION,
    DURATION_CLASS,
    MAX_TYPE_DEPTH,
    NATIVES,
    UNSET,
    CqlProtocolError,
    DataType,
    TypeId,
    Value,
)

_SHORT = struct.Struct(">H")
_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")

_NULL_BYTES: Final = b"\xff\xff\xff\xff"
_UNSET_BYTES: Final = b"\xff\xff\xff\xfe"


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
        native = NATIVES.get(tid)
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
