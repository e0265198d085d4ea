"""Server side of the memcached text + meta protocol, the answers: results in, response bytes out
(sans I/O). `codec.RequestParser` is the other half; behaviour follows memcached 1.6.18.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypeAlias

from .commands import MetaCommand, ValueItem, b64encode_key

# --------------------------------------------------------------------------- text responses

END: Final = b"END\r\n"
STORED: Final = b"STORED\r\n"
NOT_STORED: Final = b"NOT_STORED\r\n"
EXISTS: Final = b"EXISTS\r\n"
NOT_FOUND: Final = b"NOT_FOUND\r\n"
DELETED: Final = b"DELETED\r\n"
TOUCHED: Final = b"TOUCHED\r\n"
OK: Final = b"OK\r\n"
ERROR: Final = b"ERROR\r\n"
MN: Final = b"MN\r\n"


def encode_value(key: bytes, flags: int, value: bytes, cas: int | None = None) -> bytes:
    """One VALUE line plus its data block (no END)."""
    if cas is None:
        head = b"VALUE %b %d %d\r\n" % (key, flags, len(value))
    else:
        head = b"VALUE %b %d %d %d\r\n" % (key, flags, len(value), cas)
    return b"".join((head, value, b"\r\n"))


def encode_values(items: Iterable[ValueItem], *, with_cas: bool = False) -> bytes:
    """A whole get/gets/gat/gats answer: the hits, then END."""
    chunks: list[bytes] = []
    for item in items:
        cas = (item.cas or 0) if with_cas else None
        chunks.append(encode_value(item.key, item.flags, item.value, cas))
    chunks.append(END)
    return b"".join(chunks)


def encode_number(value: int) -> bytes:
    """incr/decr answer."""
    return b"%d\r\n" % value


def encode_version(version: str | bytes) -> bytes:
    return b"VERSION %b\r\n" % (version.encode() if isinstance(version, str) else version)


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    return str(value).encode()


def encode_stats(stats: Mapping[str, object] | Iterable[tuple[str | bytes, object]]) -> bytes:
    """STAT <name> <value> lines, then END."""
    pairs = stats.items() if isinstance(stats, Mapping) else stats
    lines = [b"STAT %b %b\r\n" % (_as_bytes(name), _as_bytes(value)) for name, value in pairs]
    lines.append(END)
    return b"".join(lines)


def encode_client_error(message: str) -> bytes:
    return b"CLIENT_ERROR %b\r\n" % message.encode()


def encode_server_error(message: str) -> bytes:
    return b"SERVER_ERROR %b\r\n" % message.encode()


# --------------------------------------------------------------------------- meta responses

# Return codes that the q flag hides, per command, as memcached 1.6.18 does it:
# mg hides only the miss (EN); ms and md hide HD; ma hides its success answer, HD or
# VA, unless the item was just created by N (auto-vivify). Errors are never hidden.
_QUIET_HIDES: Final[dict[str, frozenset[bytes]]] = {
    "mg": frozenset({b"EN"}),
    "ms": frozenset({b"HD"}),
    "md": frozenset({b"HD"}),
    "ma": frozenset({b"HD", b"VA"}),
}


def quiet_suppresses(command: str, code: bytes, *, vivified: bool = False) -> bool:
    """Whether a request with the q flag gets no answer for this return code."""
    if vivified and command == "ma":
        return False
    hidden = _QUIET_HIDES.get(command)
    return hidden is not None and code in hidden


# Which requested flags each command reflects back, by outcome (proto_text.c).
_MG_HIT_FLAGS: Final = frozenset("stcflhOk")
_MS_FLAGS: Final = frozenset("Okc")
_MA_HIT_FLAGS: Final = frozenset("ctOk")
_MISS_FLAGS: Final = frozenset("Ok")


def _reflected(command: str, code: bytes) -> frozenset[str]:
    hit = code == b"HD" or code == b"VA"
    if command == "ms":
        return _MS_FLAGS
    if hit and command == "mg":
        return _MG_HIT_FLAGS
    if hit and command == "ma":
        return _MA_HIT_FLAGS
    return _MISS_FLAGS


def meta_return_flags(
    request: MetaCommand,
    code: bytes,
    *,
    cas: int | None = None,
    client_flags: int | None = None,
    ttl: int | None = None,
    size: int | None = None,
    last_access: int | None = None,
    fetched: bool | None = None,
    win_sent: bool = False,
    stale: bool = False,
    won: bool = False,
) -> bytes:
    """The return flags memcached appends after ``code`` for this request, each with its
    leading space, in request order (e.g. request ``O123 k`` -> `` O123 kfoo``).

    ``ttl`` is the remaining TTL (-1: never expires). A requested value passed as None
    is left out. For mg hits, Z/X/W (win_sent/stale/won) are appended last."""
    reflected = _reflected(request.COMMAND, code)
    out: list[bytes] = []
    for flag, token in request.flags.items():
        if flag not in reflected:
            continue
        if flag == "O":
            out.append(b"O" + token)
        elif flag == "k":
            out.append(b"k" + request.wire_key + (b" b" if "b" in request.flags else b""))
        elif flag == "c":
            if cas is not None or request.COMMAND == "ms":
                out.append(b"c%d" % (cas or 0))
        else:
            value = _FLAG_VALUES[flag](client_flags, ttl, size, last_access, fetched)
            if value is not None:
                out.append(b"%b%d" % (flag.encode(), value))
    if request.COMMAND == "mg" and (code == b"HD" or code == b"VA"):
        if win_sent:
            out.append(b"Z")
        if stale:
            out.append(b"X")
        if won:
            out.append(b"W")
    if not out:
        return b""
    return b" " + b" ".join(out)


_FlagValue: TypeAlias = Callable[[int | None, int | None, int | None, int | None, bool | None], int | None]
_FLAG_VALUES: Final[dict[str, _FlagValue]] = {
    "f": lambda flags, ttl, size, la, fetched: flags,
    "t": lambda flags, ttl, size, la, fetched: ttl,
    "s": lambda flags, ttl, size, la, fetched: size,
    "l": lambda flags, ttl, size, la, fetched: la,
    "h": lambda flags, ttl, size, la, fetched: None if fetched is None else int(fetched),
}


def encode_meta(code: bytes, return_flags: bytes = b"", value: bytes | None = None) -> bytes:
    """A meta response line (``return_flags`` as built by meta_return_flags); for VA
    the size comes from ``value`` and the data block follows."""
    if code == b"VA":
        if value is None:
            raise ValueError("a VA response needs a value")
        return b"".join((b"VA %d" % len(value), return_flags, b"\r\n", value, b"\r\n"))
    return b"%b%b\r\n" % (code, return_flags)


def encode_meta_response(
    request: MetaCommand,
    code: bytes,
    *,
    value: bytes | None = None,
    vivified: bool = False,
    cas: int | None = None,
    client_flags: int | None = None,
    ttl: int | None = None,
    size: int | None = None,
    last_access: int | None = None,
    fetched: bool | None = None,
    win_sent: bool = False,
    stale: bool = False,
    won: bool = False,
) -> bytes:
    """The full answer to a meta request, or b"" when its q flag hides this code.

    ``code`` is VA (needs ``value``), HD, EN, NF, NS or EX; ``vivified`` marks an ma
    that created the item via N (memcached answers those even in quiet mode)."""
    if "q" in request.flags and quiet_suppresses(request.COMMAND, code, vivified=vivified):
        return b""
    flags = meta_return_flags(
        request,
        code,
        cas=cas,
        client_flags=client_flags,
        ttl=ttl,
        size=size,
        last_access=last_access,
        fetched=fetched,
        win_sent=win_sent,
        stale=stale,
        won=won,
    )
    return encode_meta(code, flags, value)


def encode_meta_debug(key: bytes, info: Mapping[str, object], *, base64: bool = False) -> bytes:
    """``ME <key> k=v ...`` (key re-encoded as base64 for binary keys, like memcached)."""
    wire_key = b64encode_key(key) if base64 else key
    fields = b" ".join(b"%b=%b" % (name.encode(), _as_bytes(value)) for name, value in info.items())
    return b"ME %b %b\r\n" % (wire_key, fields)
