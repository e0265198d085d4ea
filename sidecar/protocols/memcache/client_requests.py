"""Client side of the memcached protocol, sans I/O: the requests the sidecar sends a backend.

Encoders build requests from arguments, from a parsed `commands.Command` to forward it, or
`passthrough` for bytes forwarded unchanged; each says the `ResponseKind` its answer will have,
which `client_codec.ResponseParser` is told in order.
"""


from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeAlias, TypeVar

import msgspec

from .codec import RequestParser
from .commands import (
    Command,
    Delete,
    FlushAll,
    IncrDecr,
    MetaArithmetic,
    MetaCommand,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaSet,
    NeedData,
    ProtocolError,
    Quit,
    Retrieve,
    Stats,
    Store,
    Touch,
    Verbosity,
    Version,
    b64encode_key,
)

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


