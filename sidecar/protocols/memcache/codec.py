"""Server side of the memcached text + meta protocol, sans I/O (h11 style).

`RequestParser` turns bytes from a client into `commands` events; the ``encode_*``
functions (answers.py, re-exported here) turn results into response bytes. Nothing here
touches a socket.

Behaviour follows memcached 1.6.18 (proto_text.c), including its error strings, which
errors are suppressed by ``noreply``, and which malformed requests make it swallow the
data block. Deliberate differences, all stricter:

* keys with control characters are refused (memcached only splits on spaces); with
  ``control_chars_in_keys=True`` only those Python's ``bytes.split`` would also split
  on (tab, vertical tab, form feed, a bare CR) and NUL are, which is what memcached
  clients such as memaslap rely on and what pymemcache (the drain) can still send;
* flags above 2**32-1 and exptimes outside int32 are refused (memcached truncates);
* a data block not followed by ``\\r\\n`` is fatal (memcached carries on, out of sync);
* a command line longer than ``max_line_length`` is fatal (multi-key gets may be longer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal, TypeAlias, get_args

from .answers import (  # the answers live in answers.py; importable from here as before
    DELETED,
    END,
    ERROR,
    EXISTS,
    MN,
    NOT_FOUND,
    NOT_STORED,
    OK,
    STORED,
    TOUCHED,
    encode_client_error,
    encode_meta,
    encode_meta_debug,
    encode_meta_response,
    encode_number,
    encode_server_error,
    encode_stats,
    encode_value,
    encode_values,
    encode_version,
    meta_return_flags,
    quiet_suppresses,
)
from .commands import (
    NEED_DATA,
    ClientError,
    Command,
    CommandError,
    Delete,
    FlushAll,
    IncrDecr,
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaSet,
    NeedData,
    ProtocolError,
    Quit,
    Retrieve,
    RetrieveCommand,
    ServerError,
    Stats,
    Store,
    StoreCommand,
    Touch,
    Verbosity,
    Version,
)
from .tokens import (
    BAD_FORMAT,
    U32_MAX,
    U64_MAX,
    _decode_key,
    parse_int32,
    parse_meta_flags,
    parse_uint,
)

__all__ = [
    "CLIENT_ERROR_BAD_FORMAT",
    "DELETED",
    "END",
    "ERROR",
    "EXISTS",
    "MN",
    "NOT_FOUND",
    "NOT_STORED",
    "OK",
    "OUT_OF_MEMORY",
    "STORED",
    "TOUCHED",
    "Event",
    "RequestParser",
    "encode_client_error",
    "encode_meta",
    "encode_meta_debug",
    "encode_meta_response",
    "encode_number",
    "encode_server_error",
    "encode_stats",
    "encode_value",
    "encode_values",
    "encode_version",
    "meta_return_flags",
    "parse_meta_flags",
    "quiet_suppresses",
]

Event: TypeAlias = Command | ProtocolError

CLIENT_ERROR_BAD_FORMAT: Final = b"CLIENT_ERROR bad command line format\r\n"
_DELETE_USAGE: Final = "bad command line format.  Usage: delete <key> [noreply]"
_TOO_LARGE: Final = "object too large for cache"
OUT_OF_MEMORY: Final = "out of memory storing object"
_BAD_CHUNK: Final = "bad data chunk"

# Meta limits from proto_text.c: at most 19 tokens (MFLAG_MAX_OPT_LENGTH counts the
# tokenizer's terminal token) and an O token of at most 32 bytes including the 'O'.
_META_MAX_TOKENS: Final = 19
_MAX_OPAQUE: Final = 31

_ERROR_EVENT: Final = CommandError("unknown command")
_ARITY_EVENT: Final = CommandError("wrong number of arguments")
_has_ctrl: Final = re.compile(rb"[\x00-\x1f\x7f]").search
# Control characters that would change how a line splits into tokens, or that no client can send.
_has_splitting_ctrl: Final = re.compile(rb"[\x00\t\r\x0b\x0c]").search
_MULTIGET_PREFIXES: Final = (b"get ", b"gets ", b"gat ", b"gats ")

# The command word -> its name, one table per event kind so each name keeps its Literal type.
_RETRIEVE_NAMES: Final[dict[bytes, RetrieveCommand]] = {name.encode(): name for name in get_args(RetrieveCommand)}
_STORE_NAMES: Final[dict[bytes, StoreCommand]] = {name.encode(): name for name in get_args(StoreCommand)}
_ARITH_NAMES: Final[dict[bytes, Literal["incr", "decr"]]] = {b"incr": "incr", b"decr": "decr"}


# --------------------------------------------------------------------------- the parser


class RequestParser:
    """Incremental parser for client requests: `feed` bytes, then call `next_event`
    until it returns `NEED_DATA`.

    Events are commands (see `commands.Command`) or `ProtocolError`s. After a fatal
    error the parser is `broken`: it drops further input and only returns NEED_DATA.
    next_event never raises on any input.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_control_chars_in_keys",
        "_max_item_size",
        "_max_key_length",
        "_max_line_length",
        "_max_multiget_line_length",
        "_need",
        "_pending",
        "_pos",
        "_scan",
        "_swallow",
    )

    def __init__(
        self,
        *,
        max_item_size: int = 1024 * 1024,
        max_key_length: int = 250,
        max_line_length: int = 8192,
        max_multiget_line_length: int = 1024 * 1024,
        control_chars_in_keys: bool = False,
    ) -> None:
        self._buf = bytearray()
        self._control_chars_in_keys = control_chars_in_keys
        self._pos = 0  # start of unconsumed input
        self._scan = 0  # where to resume looking for b"\n" (no newline in [_pos, _scan))
        self._pending: Store | MetaSet | None = None  # storage command waiting for its data
        self._need = 0  # its data length (without the trailing \r\n)
        self._swallow = 0  # bytes of a refused data block still to discard
        self._broken = False
        self._max_item_size = max_item_size
        self._max_key_length = max_key_length
        self._max_line_length = max(max_line_length, 8)
        self._max_multiget_line_length = max(max_multiget_line_length, self._max_line_length)

    @property
    def broken(self) -> bool:
        """A fatal error happened; the connection must be closed."""
        return self._broken

    @property
    def idle(self) -> bool:
        """Between commands: not inside a data block, nothing buffered."""
        return self._pending is None and not self._swallow and self._pos == len(self._buf)

    @property
    def pending_length(self) -> int:
        """The length of the data block being received (0 when none is): what the connection is
        about to buffer, for the server to budget before it reads on."""
        return self._need if self._pending is not None else 0

    @property
    def partial_line_length(self) -> int:
        """Bytes of a command line received without its end yet (0 inside a data block)."""
        return 0 if self._pending is not None or self._swallow else len(self._buf) - self._pos

    @property
    def max_partial_line(self) -> int:
        """The longest a line may grow before it is refused (multi-key gets may be long)."""
        return self._max_multiget_line_length

    def refuse_pending(self, message: str = OUT_OF_MEMORY) -> ProtocolError:
        """Give up the data block being received: discard what came and what is still to come,
        and answer SERVER_ERROR (memcached's `out of memory storing object` when it cannot
        allocate the item). The connection goes on with the next command."""
        event = self._pending
        if event is None:
            raise RuntimeError("no data block is being received")
        total = self._need + 2
        take = min(len(self._buf) - self._pos, total)
        self._pos += take
        self._scan = self._pos
        self._swallow = total - take
        self._pending = None
        self._need_data()
        return ServerError(message, noreply=event.noreply if type(event) is Store else False)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (any split is fine)."""
        if self._broken:
            return
        if self._swallow and self._pos == len(self._buf):
            # Discard a refused data block without buffering it.
            view = memoryview(data).cast("B")
            if len(view) <= self._swallow:
                self._swallow -= len(view)
                return
            data = view[self._swallow :]
            self._swallow = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next complete command or error event, or NEED_DATA."""
        if self._pending is not None:
            return self._finish_value()
        if self._swallow and not self._do_swallow():
            return self._need_data()
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", self._scan)
        if nl < 0:
            return self._partial_line()
        if nl - pos > self._max_line_length and self._too_long(nl - pos):
            return self._fail(ClientError("line too long", fatal=True))
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        line = bytes(buf[pos:end])
        self._pos = self._scan = nl + 1
        parts = line.split()
        if not parts:
            return _ERROR_EVENT
        handler = _HANDLERS.get(parts[0])
        if handler is None:
            return self._unknown(parts)
        if _has_ctrl(line) is not None and (
            not self._control_chars_in_keys or _has_splitting_ctrl(line) is not None
        ):
            # Meta commands (b"m..") always answer errors; text ones not with noreply.
            return ClientError(BAD_FORMAT, noreply=parts[-1] == b"noreply" and parts[0][0] != 109)
        return handler(self, parts)

    # ------------------------------------------------------------------ buffer plumbing

    def _need_data(self) -> NeedData:
        """Drop consumed bytes (cheap: bytearray deletes at the front in O(1))."""
        pos = self._pos
        if pos:
            del self._buf[:pos]
            self._scan -= pos
            self._pos = 0
        return NEED_DATA

    def _partial_line(self) -> ProtocolError | NeedData:
        pending = len(self._buf) - self._pos
        if pending > self._max_line_length and self._too_long(pending):
            return self._fail(ClientError("line too long", fatal=True))
        self._scan = len(self._buf)
        return self._need_data()

    def _too_long(self, length: int) -> bool:
        """Multi-key gets may exceed max_line_length (memcached allows them unbounded)."""
        if self._buf.startswith(_MULTIGET_PREFIXES, self._pos):
            return length > self._max_multiget_line_length
        return True

    def _fail(self, event: ProtocolError) -> ProtocolError:
        self._broken = True
        self._pending = None
        self._swallow = 0
        self._buf = bytearray()
        self._pos = self._scan = 0
        return event

    def _do_swallow(self) -> bool:
        """Discard what is buffered of a refused data block; True once it is all gone."""
        take = min(len(self._buf) - self._pos, self._swallow)
        self._swallow -= take
        self._pos += take
        self._scan = self._pos
        return not self._swallow

    def _await_value(self, event: Store | MetaSet, length: int) -> Event | NeedData:
        self._pending = event
        self._need = length
        return self._finish_value()

    def _finish_value(self) -> Event | NeedData:
        event = self._pending
        assert event is not None
        buf = self._buf
        start = self._pos
        stop = start + self._need
        if len(buf) < stop + 2:
            return self._need_data()
        if buf[stop] != 13 or buf[stop + 1] != 10:
            # memcached cannot resync either: the client's framing is wrong.
            noreply = event.noreply if type(event) is Store else False
            return self._fail(ClientError(_BAD_CHUNK, fatal=True, noreply=noreply))
        if self._need > 4096:
            with memoryview(buf) as view:
                event.value = bytes(view[start:stop])
        else:
            event.value = bytes(buf[start:stop])
        self._pending = None
        self._pos = self._scan = stop + 2
        return event

    def _refuse_data(self, length: int, event: ProtocolError) -> ProtocolError:
        """Answer with an error and discard the data block that follows the line."""
        self._swallow = length + 2
        return event

    def _unknown(self, parts: list[bytes]) -> ProtocolError:
        if parts[-1].startswith(b"HTTP/"):
            # memcached closes on HTTP requests without answering.
            return self._fail(CommandError("HTTP request", fatal=True, noreply=True))
        return _ERROR_EVENT

    def _bad_key(self, key: bytes) -> bool:
        return len(key) > self._max_key_length

    # ------------------------------------------------------------------ text commands

    def _retrieve(self, parts: list[bytes]) -> Event:
        if len(parts) < 2:
            return _ARITY_EVENT
        keys = parts[1:]
        limit = self._max_key_length
        for key in keys:
            if len(key) > limit:
                return ClientError(BAD_FORMAT)
        return Retrieve(_RETRIEVE_NAMES[parts[0]], keys)

    def _gat(self, parts: list[bytes]) -> Event:
        if len(parts) < 2:
            return _ARITY_EVENT
        exptime = parse_int32(parts[1])
        if exptime is None:
            return ClientError("invalid exptime argument")
        keys = parts[2:]
        limit = self._max_key_length
        for key in keys:
            if len(key) > limit:
                return ClientError(BAD_FORMAT)
        return Retrieve(_RETRIEVE_NAMES[parts[0]], keys, exptime)

    def _store(self, parts: list[bytes]) -> Event | NeedData:
        command = _STORE_NAMES[parts[0]]
        is_cas = command == "cas"
        count = len(parts)
        if count != 5 + is_cas and count != 6 + is_cas:
            return _ARITY_EVENT
        noreply = parts[-1] == b"noreply"
        key = parts[1]
        flags = parse_uint(parts[2], U32_MAX)
        exptime = parse_int32(parts[3])
        length = parse_int32(parts[4])
        cas = parse_uint(parts[5], U64_MAX) if is_cas else None
        if (
            self._bad_key(key)
            or flags is None
            or exptime is None
            or length is None
            or length < 0
            or (is_cas and cas is None)
        ):
            # Like memcached, the data block is not swallowed: it is read as a command.
            return ClientError(BAD_FORMAT, noreply=noreply)
        if length > self._max_item_size:
            return self._refuse_data(length, ServerError(_TOO_LARGE, noreply=noreply))
        return self._await_value(Store(command, key, b"", flags, exptime, cas, noreply), length)

    def _incr_decr(self, parts: list[bytes]) -> Event:
        if len(parts) not in (3, 4):
            return _ARITY_EVENT
        noreply = parts[-1] == b"noreply"
        if self._bad_key(parts[1]):
            return ClientError(BAD_FORMAT, noreply=noreply)
        delta = parse_uint(parts[2], U64_MAX)
        if delta is None:
            return ClientError("invalid numeric delta argument", noreply=noreply)
        return IncrDecr(_ARITH_NAMES[parts[0]], parts[1], delta, noreply)

    def _touch(self, parts: list[bytes]) -> Event:
        if len(parts) not in (3, 4):
            return _ARITY_EVENT
        noreply = parts[-1] == b"noreply"
        if self._bad_key(parts[1]):
            return ClientError(BAD_FORMAT, noreply=noreply)
        exptime = parse_int32(parts[2])
        if exptime is None:
            return ClientError("invalid exptime argument", noreply=noreply)
        return Touch(parts[1], exptime, noreply)

    def _delete(self, parts: list[bytes]) -> Event:
        count = len(parts)
        if not 2 <= count <= 4:
            return _ARITY_EVENT
        noreply = False
        if count > 2:
            # memcached still accepts the legacy hold time, but only "0".
            hold_is_zero = parts[2] == b"0"
            noreply = parts[-1] == b"noreply"
            if not ((count == 3 and (hold_is_zero or noreply)) or (hold_is_zero and noreply)):
                return ClientError(_DELETE_USAGE, noreply=noreply)
        if self._bad_key(parts[1]):
            return ClientError(BAD_FORMAT, noreply=noreply)
        return Delete(parts[1], noreply)

    def _verbosity(self, parts: list[bytes]) -> Event:
        if len(parts) not in (2, 3):
            return _ARITY_EVENT
        noreply = parts[-1] == b"noreply"
        level = parse_uint(parts[1], U32_MAX)
        if level is None:
            return ClientError(BAD_FORMAT, noreply=noreply)
        return Verbosity(level, noreply)

    def _flush_all(self, parts: list[bytes]) -> Event:
        count = len(parts)
        if count > 3:
            return _ARITY_EVENT
        noreply = parts[-1] == b"noreply"
        if count == 1 + noreply:
            return FlushAll(0, noreply)
        delay = parse_int32(parts[1])
        if delay is None:
            return ClientError("invalid exptime argument", noreply=noreply)
        return FlushAll(delay, noreply)

    def _stats(self, parts: list[bytes]) -> Event:
        return Stats(parts[1:])

    def _version(self, parts: list[bytes]) -> Event:
        return Version()

    def _quit(self, parts: list[bytes]) -> Event:
        return Quit()

    # ------------------------------------------------------------------ meta commands

    def _meta(self, parts: list[bytes]) -> Event:
        """mg, md and ma share everything but error wording and the ma mode check."""
        count = len(parts)
        if count < 2:
            return _ARITY_EVENT
        command = parts[0]
        key = parts[1]
        if self._bad_key(key):
            return ClientError(BAD_FORMAT)
        if count > _META_MAX_TOKENS:
            return ClientError("options flags are too long" if command == b"mg" else "options flags too long")
        flags, key, error = parse_meta_flags(parts[2:], key)
        if error is not None:
            return ClientError(error if command == b"mg" else "invalid or duplicate flag")
        if command == b"ma" and flags.get("M", b"I") not in (b"I", b"+", b"D", b"-"):
            return ClientError("invalid mode for ma M token")
        if len(flags.get("O", b"")) > _MAX_OPAQUE:
            return ClientError("opaque token too long")
        if command == b"mg":
            return MetaGet(key, flags)
        if command == b"md":
            return MetaDelete(key, flags)
        return MetaArithmetic(key, flags)

    def _meta_set(self, parts: list[bytes]) -> Event | NeedData:
        count = len(parts)
        if count < 2:
            return _ARITY_EVENT
        key = parts[1]
        if self._bad_key(key) or count == 2:
            return ClientError(BAD_FORMAT)
        if count > _META_MAX_TOKENS:
            return ClientError("options flags too long")
        length = parse_int32(parts[2])
        if length is None or length < 0:
            return ClientError(BAD_FORMAT)  # length unknown: nothing to swallow
        flags, key, error = parse_meta_flags(parts[3:], key)
        if error is None:
            if flags.get("M", b"S") not in (b"S", b"E", b"A", b"P", b"R"):
                error = "invalid mode for ms M token"
            elif len(flags.get("O", b"")) > _MAX_OPAQUE:
                error = "opaque token too long"
        if error is not None:
            return self._refuse_data(length, ClientError(error))
        if length > self._max_item_size:
            return self._refuse_data(length, ServerError(_TOO_LARGE))
        return self._await_value(MetaSet(key, flags, b""), length)

    def _meta_debug(self, parts: list[bytes]) -> Event:
        if len(parts) < 2 or self._bad_key(parts[1]):
            return ClientError(BAD_FORMAT)
        if len(parts) > 2 and parts[2] == b"b":
            key = _decode_key(parts[1])
            if key is None:
                return ClientError(BAD_FORMAT)
            return MetaDebug(key, True)
        return MetaDebug(parts[1], False)

    def _meta_noop(self, parts: list[bytes]) -> Event:
        return MetaNoop()


_Handler: TypeAlias = Callable[[RequestParser, list[bytes]], "Event | NeedData"]
_HANDLERS: Final[dict[bytes, _Handler]] = {
    b"get": RequestParser._retrieve,
    b"gets": RequestParser._retrieve,
    b"gat": RequestParser._gat,
    b"gats": RequestParser._gat,
    b"set": RequestParser._store,
    b"add": RequestParser._store,
    b"replace": RequestParser._store,
    b"append": RequestParser._store,
    b"prepend": RequestParser._store,
    b"cas": RequestParser._store,
    b"incr": RequestParser._incr_decr,
    b"decr": RequestParser._incr_decr,
    b"touch": RequestParser._touch,
    b"delete": RequestParser._delete,
    b"verbosity": RequestParser._verbosity,
    b"flush_all": RequestParser._flush_all,
    b"stats": RequestParser._stats,
    b"version": RequestParser._version,
    b"quit": RequestParser._quit,
    b"mg": RequestParser._meta,
    b"md": RequestParser._meta,
    b"ma": RequestParser._meta,
    b"ms": RequestParser._meta_set,
    b"me": RequestParser._meta_debug,
    b"mn": RequestParser._meta_noop,
}


