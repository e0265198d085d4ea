"""Client side of the memcached protocol, sans I/O: the sidecar talking to a backend.

Encoders (client_requests.py, re-exported here) build requests (from arguments, from a
parsed `commands.Command` to forward it, or `passthrough` for bytes forwarded unchanged);
`ResponseParser` parses the backend's answers. Requests are pipelined,
so the parser is told, in order, what kind of answer each request gets
(`ResponseParser.expect`); every response event carries its exact bytes (``raw``) so
it can be relayed verbatim to the sidecar's own client.

Only register requests that are sure to be answered: text commands with noreply get
no answer at all, and meta commands with q may or may not get one. Forward quiet meta
requests with `strip_quiet` and apply `codec.quiet_suppresses` on the way back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from .client_requests import (  # the requests live in client_requests.py; importable from here as before
    ResponseKind,
    encode_command,
    encode_decr,
    encode_delete,
    encode_gat,
    encode_get,
    encode_incr,
    encode_meta,
    encode_meta_get,
    encode_meta_set,
    encode_store,
    encode_touch,
    passthrough,
    response_kind,
    strip_quiet,
)
from .codec import U32_MAX, U64_MAX, parse_uint
from .commands import (
    NEED_DATA,
    ErrorResponse,
    MetaDebugInfo,
    MetaResponse,
    NeedData,
    Number,
    Response,
    StatsReport,
    Status,
    ValueItem,
    Values,
    VersionInfo,
)

__all__ = [
    "BackendProtocolError",
    "ResponseKind",
    "ResponseParser",
    "encode_command",
    "encode_decr",
    "encode_delete",
    "encode_gat",
    "encode_get",
    "encode_incr",
    "encode_meta",
    "encode_meta_get",
    "encode_meta_set",
    "encode_store",
    "encode_touch",
    "passthrough",
    "response_kind",
    "strip_quiet",
]

class BackendProtocolError(Exception):
    """The backend sent something that is not an answer to the pending request; the
    connection is out of sync and must be closed."""


# --------------------------------------------------------------------------- response parser

_STATUS_CODES: Final[dict[ResponseKind, frozenset[bytes]]] = {
    ResponseKind.STORE: frozenset({b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"}),
    ResponseKind.DELETE: frozenset({b"DELETED", b"NOT_FOUND"}),
    ResponseKind.TOUCH: frozenset({b"TOUCHED", b"NOT_FOUND"}),
    ResponseKind.OK: frozenset({b"OK"}),
}
_META_CODES: Final = frozenset({b"HD", b"EN", b"NF", b"NS", b"EX", b"MN"})
_STATS_SINGLE: Final = frozenset({b"RESET", b"OK"})


def _error_response(line: bytes) -> ErrorResponse | None:
    """ERROR / CLIENT_ERROR <msg> / SERVER_ERROR <msg>, which may end any response."""
    kind, _, message = line.partition(b" ")
    if kind in (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"):
        return ErrorResponse(kind, message)
    return None


def _meta_flags(tokens: list[bytes]) -> dict[str, bytes]:
    return {chr(token[0]): token[1:] for token in tokens}


class ResponseParser:
    """Incremental parser for a backend's answers. Call `expect` once per request sent
    (in order), `feed` received bytes, then `next_event` until NEED_DATA.

    Raises `BackendProtocolError` on anything that cannot be the expected answer."""

    __slots__ = (
        "_buf",
        "_cursor",
        "_expect",
        "_items",
        "_max_line_length",
        "_max_value_size",
        "_pos",
        "_scan",
        "_stats",
    )

    def __init__(self, *, max_value_size: int = 128 * 1024 * 1024, max_line_length: int = 64 * 1024) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the response being parsed
        self._cursor = 0  # start of its next unparsed line
        self._scan = 0  # where to resume looking for b"\n"
        self._expect: deque[ResponseKind] = deque()
        self._items: list[ValueItem] = []  # VALUEs of an unfinished retrieval answer
        self._stats: list[tuple[bytes, bytes]] = []
        self._max_value_size = max_value_size
        self._max_line_length = max_line_length

    def expect(self, kind: ResponseKind | None) -> None:
        """Register the answer shape of the next request sent; None (a request that gets
        no answer, see `response_kind`) is ignored."""
        if kind is not None:
            self._expect.append(kind)

    @property
    def pending(self) -> int:
        """Requests still waiting for their answer."""
        return len(self._expect)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_event(self) -> Response | NeedData:
        """The next complete answer, or NEED_DATA."""
        if not self._expect:
            if len(self._buf) > self._pos:
                raise BackendProtocolError("data received with no request pending")
            return self._need_data()
        event = _PARSERS[self._expect[0]](self)
        if event is None:
            return self._need_data()
        self._expect.popleft()
        return event

    # ------------------------------------------------------------------ plumbing

    def _need_data(self) -> NeedData:
        pos = self._pos
        if pos:
            del self._buf[:pos]
            self._cursor -= pos
            self._scan -= pos
            self._pos = 0
        return NEED_DATA

    def _read_line(self) -> tuple[bytes, int] | None:
        """The line at the cursor (without its line ending) and where the next begins."""
        buf = self._buf
        cursor = self._cursor
        nl = buf.find(b"\n", max(self._scan, cursor))
        if nl < 0:
            if len(buf) - cursor > self._max_line_length:
                raise BackendProtocolError("response line too long")
            self._scan = len(buf)
            return None
        end = nl - 1 if nl > cursor and buf[nl - 1] == 13 else nl
        return bytes(buf[cursor:end]), nl + 1

    def _data_block(self, start: int, size: int) -> bytes | None:
        """``size`` bytes at ``start`` followed by \\r\\n, or None if not all here yet."""
        buf = self._buf
        stop = start + size
        if len(buf) < stop + 2:
            return None
        if buf[stop] != 13 or buf[stop + 1] != 10:
            raise BackendProtocolError("data block not terminated by \\r\\n")
        if size > 4096:
            with memoryview(buf) as view:
                return bytes(view[start:stop])
        return bytes(buf[start:stop])

    def _finish(self, end: int) -> bytes:
        """Consume the current response up to ``end``; returns its raw bytes."""
        raw = bytes(self._buf[self._pos : end])
        self._pos = self._cursor = self._scan = end
        return raw

    def _size(self, token: bytes) -> int:
        size = parse_uint(token, self._max_value_size)
        if size is None:
            raise BackendProtocolError(f"bad or too large data length {token!r}")
        return size

    # ------------------------------------------------------------------ per kind

    def _status(self) -> Response | None:
        got = self._read_line()
        if got is None:
            return None
        line, after = got
        if line in _STATUS_CODES[self._expect[0]]:
            return Status(line, self._finish(after))
        return self._error_or_raise(line, after)

    def _arith(self) -> Response | None:
        got = self._read_line()
        if got is None:
            return None
        line, after = got
        digits = line.rstrip(b" ")  # memcached may space-pad a shrunk decr result
        if digits.isdigit():
            value = parse_uint(digits, U64_MAX)
            if value is not None:
                return Number(value, self._finish(after))
        if line == b"NOT_FOUND":
            return Status(line, self._finish(after))
        return self._error_or_raise(line, after)

    def _version(self) -> Response | None:
        got = self._read_line()
        if got is None:
            return None
        line, after = got
        if line.startswith(b"VERSION "):
            return VersionInfo(line[8:], self._finish(after))
        return self._error_or_raise(line, after)

    def _values(self) -> Response | None:
        while True:
            got = self._read_line()
            if got is None:
                return None
            line, after = got
            if line == b"END":
                items, self._items = self._items, []
                return Values(items, self._finish(after))
            if not line.startswith(b"VALUE "):
                self._items = []
                return self._error_or_raise(line, after)
            item = self._value_item(line, after)
            if item is None:
                return None
            self._items.append(item)

    def _value_item(self, line: bytes, after: int) -> ValueItem | None:
        """Parse ``VALUE <key> <flags> <bytes> [<cas>]`` and its data block."""
        parts = line.split()
        if len(parts) not in (4, 5):
            raise BackendProtocolError(f"bad VALUE line {line[:100]!r}")
        flags = parse_uint(parts[2], U32_MAX)
        cas = parse_uint(parts[4], U64_MAX) if len(parts) == 5 else None
        if flags is None or (len(parts) == 5 and cas is None):
            raise BackendProtocolError(f"bad VALUE line {line[:100]!r}")
        size = self._size(parts[3])
        value = self._data_block(after, size)
        if value is None:
            return None  # re-read this VALUE line once more data arrived
        self._cursor = self._scan = after + size + 2
        return ValueItem(parts[1], flags, value, cas)

    def _stats_report(self) -> Response | None:
        while True:
            got = self._read_line()
            if got is None:
                return None
            line, after = got
            if line.startswith(b"STAT "):
                name, _, value = line[5:].partition(b" ")
                self._stats.append((name, value))
                self._cursor = self._scan = after
                continue
            stats, self._stats = self._stats, []
            if line == b"END":
                return StatsReport(stats, self._finish(after))
            if not stats and line in _STATS_SINGLE:
                return Status(line, self._finish(after))
            return self._error_or_raise(line, after)

    def _meta(self) -> Response | None:
        got = self._read_line()
        if got is None:
            return None
        line, after = got
        code = line[:2]
        separated = len(line) == 2 or line[2:3] == b" "
        if code == b"VA" and separated:
            parts = line.split()
            if len(parts) < 2:
                raise BackendProtocolError("VA without a size")
            size = self._size(parts[1])
            value = self._data_block(after, size)
            if value is None:
                return None
            return MetaResponse(code, _meta_flags(parts[2:]), value, self._finish(after + size + 2))
        if code in _META_CODES and separated:
            return MetaResponse(code, _meta_flags(line.split()[1:]), None, self._finish(after))
        if code == b"ME" and separated:
            parts = line.split()
            if len(parts) < 2:
                raise BackendProtocolError("ME without a key")
            info = dict(part.split(b"=", 1) for part in parts[2:] if b"=" in part)
            return MetaDebugInfo(parts[1], info, self._finish(after))
        return self._error_or_raise(line, after)

    def _error_or_raise(self, line: bytes, after: int) -> ErrorResponse:
        error = _error_response(line)
        if error is None:
            kind = self._expect[0].value
            raise BackendProtocolError(f"unexpected line for a {kind} answer: {line[:100]!r}")
        error.raw = self._finish(after)
        return error


_PARSERS: Final[dict[ResponseKind, Callable[[ResponseParser], Response | None]]] = {
    ResponseKind.VALUES: ResponseParser._values,
    ResponseKind.STORE: ResponseParser._status,
    ResponseKind.DELETE: ResponseParser._status,
    ResponseKind.TOUCH: ResponseParser._status,
    ResponseKind.OK: ResponseParser._status,
    ResponseKind.ARITH: ResponseParser._arith,
    ResponseKind.VERSION: ResponseParser._version,
    ResponseKind.STATS: ResponseParser._stats_report,
    ResponseKind.META: ResponseParser._meta,
}
