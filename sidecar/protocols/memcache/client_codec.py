"""Client side of the memcached protocol, sans I/O: the sidecar talking to a backend.

Encoders build requests (from arguments, from a parsed `commands.Command` to forward
it, or `passthrough` for bytes forwarded unchanged); `ResponseParser` parses the
backend's answers. Requests are pipelined,
so the parser is told, in order, what kind of answer each request gets
(`ResponseParser.expect`); every response event carries its exact bytes (``raw``) so
it can be relayed verbatim to the sidecar's own client.

Only register requests that are sure to be answered: text commands with noreply get
no answer at all, and meta commands with q may or may not get one. Forward quiet meta
requests with `strip_quiet` and apply `codec.quiet_suppresses` on the way back.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeAlias, TypeVar

import msgspec

from .codec import U32_MAX, U64_MAX, RequestParser, parse_uint
from .commands import (
    NEED_DATA,
    Command,
    Delete,
    ErrorResponse,
    FlushAll,
    IncrDecr,
    MetaArithmetic,
    MetaCommand,
    MetaDebug,
    MetaDebugInfo,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaResponse,
    MetaSet,
    NeedData,
    Number,
    ProtocolError,
    Quit,
    Response,
    Retrieve,
    Stats,
    StatsReport,
    Status,
    Store,
    Touch,
    ValueItem,
    Values,
    Verbosity,
    Version,
    VersionInfo,
    b64encode_key,
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

FlagValue: TypeAlias = bytes | str | int
MetaFlags: TypeAlias = Mapping[str, FlagValue]


class ResponseKind(enum.Enum):
    """The shape of the answer a request gets."""

    VALUES = "values"  # get/gets/gat/gats: VALUE items, then END
    STORE = "store"  # STORED / NOT_STORED / EXISTS / NOT_FOUND
    DELETE = "delete"  # DELETED / NOT_FOUND
    TOUCH = "touch"  # TOUCHED / NOT_FOUND
    ARITH = "arith"  # <number> / NOT_FOUND
    OK = "ok"  # flush_all, verbosity
    VERSION = "version"  # VERSION <x>
    STATS = "stats"  # STAT lines, then END (or RESET / OK)
    META = "meta"  # VA+data / HD / EN / NF / NS / EX / MN / ME


class BackendProtocolError(Exception):
    """The backend sent something that is not an answer to the pending request; the
    connection is out of sync and must be closed."""


# --------------------------------------------------------------------------- encoders

_STORE_NAMES: Final = {name: name.encode() for name in ("set", "add", "replace", "append", "prepend", "cas")}
_FLAG_BYTES: Final = {chr(i): bytes([i]) for i in range(128)}


def _token(value: FlagValue) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return b"%d" % value
    return value.encode()


def encode_get(keys: Sequence[bytes], *, cas: bool = False) -> bytes:
    """get/gets <keys>."""
    return b"".join((b"gets " if cas else b"get ", b" ".join(keys), b"\r\n"))


def encode_gat(exptime: int, keys: Sequence[bytes], *, cas: bool = False) -> bytes:
    """gat/gats <exptime> <keys>."""
    return b"%b %d %b\r\n" % (b"gats" if cas else b"gat", exptime, b" ".join(keys))


def encode_store(
    command: str,
    key: bytes,
    value: bytes,
    *,
    flags: int = 0,
    exptime: int = 0,
    cas: int | None = None,
    noreply: bool = False,
) -> bytes:
    """set/add/replace/append/prepend/cas with its data block; cas needs ``cas``."""
    if (command == "cas") != (cas is not None):
        raise ValueError("the cas command, and only it, takes a cas unique")
    head = b"%b %b %d %d %d" % (_STORE_NAMES[command], key, flags, exptime, len(value))
    if cas is not None:
        head += b" %d" % cas
    if noreply:
        head += b" noreply"
    return b"".join((head, b"\r\n", value, b"\r\n"))


def encode_delete(key: bytes, *, noreply: bool = False) -> bytes:
    return b"delete %b%b\r\n" % (key, b" noreply" if noreply else b"")


def encode_incr(key: bytes, delta: int, *, noreply: bool = False) -> bytes:
    return b"incr %b %d%b\r\n" % (key, delta, b" noreply" if noreply else b"")


def encode_decr(key: bytes, delta: int, *, noreply: bool = False) -> bytes:
    return b"decr %b %d%b\r\n" % (key, delta, b" noreply" if noreply else b"")


def encode_touch(key: bytes, exptime: int, *, noreply: bool = False) -> bytes:
    return b"touch %b %d%b\r\n" % (key, exptime, b" noreply" if noreply else b"")


def encode_meta(command: str, key: bytes = b"", flags: MetaFlags | None = None, value: bytes | None = None) -> bytes:
    """Any meta request: mg/md/ma/me <key> <flags>, ms <key> <len> <flags> + data, mn.

    ``key`` is the binary key when ``flags`` has ``b`` (it is base64-encoded here), so
    ``encode_meta(cmd.COMMAND, cmd.key, cmd.flags)`` re-encodes a parsed request."""
    if command == "mn":
        return b"mn\r\n"
    flags = flags or {}
    wire_key = b64encode_key(key) if "b" in flags else key
    parts = [command.encode(), wire_key]
    if command == "ms":
        parts.append(b"%d" % len(value or b""))
    parts.extend(_FLAG_BYTES[flag] + _token(token) for flag, token in flags.items())
    line = b" ".join(parts)
    if command == "ms":
        return b"".join((line, b"\r\n", value or b"", b"\r\n"))
    return line + b"\r\n"


def encode_meta_get(key: bytes, flags: MetaFlags | None = None) -> bytes:
    return encode_meta("mg", key, flags)


def encode_meta_set(key: bytes, value: bytes, flags: MetaFlags | None = None) -> bytes:
    return encode_meta("ms", key, flags, value)


def _encode_retrieve(cmd: Retrieve) -> bytes:
    if cmd.exptime is None:
        return encode_get(cmd.keys, cas=cmd.return_cas)
    return encode_gat(cmd.exptime, cmd.keys, cas=cmd.return_cas)


def _encode_store(cmd: Store) -> bytes:
    return encode_store(
        cmd.command, cmd.key, cmd.value, flags=cmd.flags, exptime=cmd.exptime, cas=cmd.cas, noreply=cmd.noreply
    )


def _encode_incr_decr(cmd: IncrDecr) -> bytes:
    return b"%b %b %d%b\r\n" % (cmd.command.encode(), cmd.key, cmd.delta, b" noreply" if cmd.noreply else b"")


def _encode_stats(cmd: Stats) -> bytes:
    return b" ".join([b"stats", *cmd.args]) + b"\r\n"


def _encode_flush_all(cmd: FlushAll) -> bytes:
    if cmd.delay == 0:
        return b"flush_all noreply\r\n" if cmd.noreply else b"flush_all\r\n"
    return b"flush_all %d%b\r\n" % (cmd.delay, b" noreply" if cmd.noreply else b"")


def _encode_meta_command(cmd: MetaCommand) -> bytes:
    return encode_meta(cmd.COMMAND, cmd.key, cmd.flags, cmd.value if type(cmd) is MetaSet else None)


def _encode_meta_debug(cmd: MetaDebug) -> bytes:
    return b"me %b%b\r\n" % (cmd.wire_key, b" b" if cmd.base64 else b"")


_ENCODERS: Final[dict[type, Callable[..., bytes]]] = {
    Retrieve: _encode_retrieve,
    Store: _encode_store,
    Delete: lambda cmd: encode_delete(cmd.key, noreply=cmd.noreply),
    IncrDecr: _encode_incr_decr,
    Touch: lambda cmd: encode_touch(cmd.key, cmd.exptime, noreply=cmd.noreply),
    Stats: _encode_stats,
    Version: lambda cmd: b"version\r\n",
    Verbosity: lambda cmd: b"verbosity %d%b\r\n" % (cmd.level, b" noreply" if cmd.noreply else b""),
    FlushAll: _encode_flush_all,
    Quit: lambda cmd: b"quit\r\n",
    MetaGet: _encode_meta_command,
    MetaSet: _encode_meta_command,
    MetaDelete: _encode_meta_command,
    MetaArithmetic: _encode_meta_command,
    MetaDebug: _encode_meta_debug,
    MetaNoop: lambda cmd: b"mn\r\n",
}


def encode_command(cmd: Command) -> bytes:
    """Wire bytes for a parsed request, e.g. to forward a client's command to a backend."""
    return _ENCODERS[type(cmd)](cmd)


_KINDS: Final[dict[type, ResponseKind | None]] = {
    Retrieve: ResponseKind.VALUES,
    Store: ResponseKind.STORE,
    Delete: ResponseKind.DELETE,
    IncrDecr: ResponseKind.ARITH,
    Touch: ResponseKind.TOUCH,
    Stats: ResponseKind.STATS,
    Version: ResponseKind.VERSION,
    Verbosity: ResponseKind.OK,
    FlushAll: ResponseKind.OK,
    Quit: None,
    MetaGet: ResponseKind.META,
    MetaSet: ResponseKind.META,
    MetaDelete: ResponseKind.META,
    MetaArithmetic: ResponseKind.META,
    MetaDebug: ResponseKind.META,
    MetaNoop: ResponseKind.META,
}


def response_kind(cmd: Command) -> ResponseKind | None:
    """What to `expect` after sending ``cmd``; None when no answer comes (noreply, quit).

    Raises ValueError for meta requests with q: whether they are answered depends on
    the outcome, so they cannot be pipelined blindly (forward `strip_quiet(cmd)`)."""
    if getattr(cmd, "noreply", False):
        return None
    if isinstance(cmd, MetaCommand) and "q" in cmd.flags:
        raise ValueError(f"{cmd.COMMAND} with q may get no answer; forward strip_quiet(cmd)")
    return _KINDS[type(cmd)]


def passthrough(raw: bytes) -> tuple[bytes, ResponseKind | None]:
    """An already-encoded request to forward unchanged, and the answer kind to expect.

    Raises ValueError unless ``raw`` is exactly one complete, valid request (same
    rules as the server parser, so a refused request is never sent to a backend)."""
    parser = RequestParser(max_item_size=len(raw), max_multiget_line_length=max(len(raw), 8192))
    parser.feed(raw)
    event = parser.next_event()
    if isinstance(event, NeedData | ProtocolError) or not parser.idle:
        raise ValueError(f"not exactly one valid request: {raw[:80]!r}")
    return raw, response_kind(event)


_Meta = TypeVar("_Meta", bound=MetaCommand)


def strip_quiet(cmd: _Meta) -> _Meta:
    """The same meta request without q, so the backend always answers."""
    if "q" not in cmd.flags:
        return cmd
    return msgspec.structs.replace(cmd, flags={f: t for f, t in cmd.flags.items() if f != "q"})


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
