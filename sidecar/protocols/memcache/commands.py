"""Memcached protocol events, both directions.

* Requests (client -> sidecar): what `codec.RequestParser` emits and what
  `client_codec.encode_command` turns back into wire bytes for a backend.
* Parser error events: `CommandError` (ERROR), `ClientError`, `ServerError`.
* Responses (backend memcached -> sidecar): what `client_codec.ResponseParser` emits.

All are msgspec Structs with ``gc=False``: one is built per command on a hot path,
and they only hold bytes, ints and lists/dicts of those, so they can never be part
of a reference cycle and need no GC tracking.
"""

from __future__ import annotations

import binascii
from typing import ClassVar, Final, Literal, TypeAlias

import msgspec

__all__ = [
    "NEED_DATA",
    "ClientError",
    "Command",
    "CommandError",
    "Delete",
    "ErrorResponse",
    "FlushAll",
    "IncrDecr",
    "MetaArithmetic",
    "MetaCommand",
    "MetaDebug",
    "MetaDebugInfo",
    "MetaDelete",
    "MetaGet",
    "MetaNoop",
    "MetaResponse",
    "MetaSet",
    "NeedData",
    "Number",
    "ProtocolError",
    "Quit",
    "Response",
    "Retrieve",
    "ServerError",
    "Stats",
    "StatsReport",
    "Status",
    "Store",
    "Touch",
    "ValueItem",
    "Values",
    "Verbosity",
    "Version",
    "VersionInfo",
]


class NeedData:
    """Type of the `NEED_DATA` sentinel: feed more bytes before asking again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

RetrieveCommand: TypeAlias = Literal["get", "gets", "gat", "gats"]
StoreCommand: TypeAlias = Literal["set", "add", "replace", "append", "prepend", "cas"]


def b64encode_key(key: bytes) -> bytes:
    """Base64 form of a binary key, as meta commands carry it with the `b` flag."""
    return binascii.b2a_base64(key, newline=False)


# --------------------------------------------------------------------------- text requests


class Retrieve(msgspec.Struct, gc=False):
    """get/gets/gat/gats <keys>; gat/gats carry the new exptime (``None`` otherwise)."""

    command: RetrieveCommand
    keys: list[bytes]
    exptime: int | None = None

    @property
    def return_cas(self) -> bool:
        """gets/gats answer with the cas unique on every VALUE line."""
        return self.command in ("gets", "gats")

    @property
    def touch(self) -> bool:
        return self.exptime is not None


class Store(msgspec.Struct, gc=False):
    """set/add/replace/append/prepend/cas; ``cas`` is the cas unique (cas command only)."""

    command: StoreCommand
    key: bytes
    value: bytes
    flags: int = 0
    exptime: int = 0
    cas: int | None = None
    noreply: bool = False


class Delete(msgspec.Struct, gc=False):
    key: bytes
    noreply: bool = False


class IncrDecr(msgspec.Struct, gc=False):
    """incr/decr <key> <delta>: delta is an unsigned 64-bit number."""

    command: Literal["incr", "decr"]
    key: bytes
    delta: int
    noreply: bool = False


class Touch(msgspec.Struct, gc=False):
    key: bytes
    exptime: int
    noreply: bool = False


class Stats(msgspec.Struct, gc=False):
    """stats [args...]: which report is the server's business; the codec keeps the tokens."""

    args: list[bytes] = msgspec.field(default_factory=list)


class Version(msgspec.Struct, gc=False):
    pass


class Verbosity(msgspec.Struct, gc=False):
    level: int
    noreply: bool = False


class FlushAll(msgspec.Struct, gc=False):
    """flush_all [delay] [noreply]; a delay <= 0 means now."""

    delay: int = 0
    noreply: bool = False


class Quit(msgspec.Struct, gc=False):
    pass


# --------------------------------------------------------------------------- meta requests


class MetaCommand(msgspec.Struct, gc=False):
    """Base of mg/ms/md/ma. ``flags`` maps each flag character to its token (b"" if none),
    in request order, exactly as parsed, so a server can inspect and re-encode them.
    With the ``b`` flag, ``key`` holds the *decoded* binary key (see `wire_key`)."""

    key: bytes
    flags: dict[str, bytes] = msgspec.field(default_factory=dict)

    COMMAND: ClassVar[str] = ""

    @property
    def opaque(self) -> bytes | None:
        return self.flags.get("O")

    @property
    def quiet(self) -> bool:
        return "q" in self.flags

    @property
    def base64(self) -> bool:
        return "b" in self.flags

    @property
    def wire_key(self) -> bytes:
        """The key as it travels on the wire (base64 again when the `b` flag is set)."""
        return b64encode_key(self.key) if "b" in self.flags else self.key

    @property
    def return_value(self) -> bool:
        return "v" in self.flags

    @property
    def ttl(self) -> int | None:
        """The T flag: new TTL (mg/md/ma) or the item's TTL (ms)."""
        return self.int_flag("T")

    @property
    def compare_cas(self) -> int | None:
        """The C flag: only act if the item's cas matches."""
        return self.int_flag("C")

    @property
    def invalidate(self) -> bool:
        return "I" in self.flags

    @property
    def vivify_ttl(self) -> int | None:
        """The N flag: create the item on a miss with this TTL."""
        return self.int_flag("N")

    def int_flag(self, flag: str, default: int | None = None) -> int | None:
        """A numeric flag token (validated by the parser), or ``default`` if absent."""
        token = self.flags.get(flag)
        return default if token is None else int(token)


class MetaGet(MetaCommand):
    COMMAND: ClassVar[str] = "mg"

    @property
    def recache_ttl(self) -> int | None:
        return self.int_flag("R")


_MS_MODES: Final[dict[bytes, StoreCommand]] = {
    b"S": "set",
    b"E": "add",
    b"A": "append",
    b"P": "prepend",
    b"R": "replace",
}


class MetaSet(MetaCommand):
    """ms <key> <datalen> <flags>* followed by the data block."""

    value: bytes = b""

    COMMAND: ClassVar[str] = "ms"

    @property
    def client_flags(self) -> int:
        return self.int_flag("F", 0) or 0

    @property
    def store_command(self) -> StoreCommand:
        """The text-protocol equivalent: mode M (default set); a C flag turns set/replace into cas."""
        command = _MS_MODES.get(self.flags.get("M", b"S"), "set")
        if "C" in self.flags and command in ("set", "replace"):
            return "cas"
        return command


class MetaDelete(MetaCommand):
    COMMAND: ClassVar[str] = "md"


class MetaArithmetic(MetaCommand):
    COMMAND: ClassVar[str] = "ma"

    @property
    def incr(self) -> bool:
        """Mode I/+ (the default) increments, D/- decrements."""
        return self.flags.get("M", b"I") in (b"I", b"+")

    @property
    def delta(self) -> int:
        return self.int_flag("D", 1) or 0

    @property
    def initial(self) -> int:
        return self.int_flag("J", 0) or 0


class MetaDebug(msgspec.Struct, gc=False):
    """me <key> [b]: a human readable dump of an item's metadata."""

    key: bytes
    base64: bool = False

    COMMAND: ClassVar[str] = "me"

    @property
    def wire_key(self) -> bytes:
        return b64encode_key(self.key) if self.base64 else self.key


class MetaNoop(msgspec.Struct, gc=False):
    """mn: answered with MN once everything before it was answered."""

    COMMAND: ClassVar[str] = "mn"


Command: TypeAlias = (
    Retrieve
    | Store
    | Delete
    | IncrDecr
    | Touch
    | Stats
    | Version
    | Verbosity
    | FlushAll
    | Quit
    | MetaGet
    | MetaSet
    | MetaDelete
    | MetaArithmetic
    | MetaDebug
    | MetaNoop
)


# --------------------------------------------------------------------------- parser errors


class ProtocolError(msgspec.Struct, frozen=True, gc=False):
    """A request the parser refused. ``fatal``: the connection cannot be resynchronised and
    must be closed. ``noreply``: memcached would stay silent (a text command with noreply)."""

    message: str = ""
    fatal: bool = False
    noreply: bool = False

    PREFIX: ClassVar[bytes] = b"ERROR"

    @property
    def line(self) -> bytes:
        """The full response line memcached sends for this error."""
        if not self.message:
            return self.PREFIX + b"\r\n"
        return b"%b %b\r\n" % (self.PREFIX, self.message.encode())

    @property
    def response(self) -> bytes:
        """What to write back: `line`, or nothing when memcached would not answer."""
        return b"" if self.noreply else self.line


class CommandError(ProtocolError, frozen=True):
    """Unknown command or wrong number of tokens: memcached answers a bare ERROR."""

    @property
    def line(self) -> bytes:
        return b"ERROR\r\n"


class ClientError(ProtocolError, frozen=True):
    PREFIX: ClassVar[bytes] = b"CLIENT_ERROR"


class ServerError(ProtocolError, frozen=True):
    PREFIX: ClassVar[bytes] = b"SERVER_ERROR"


# --------------------------------------------------------------------------- backend responses
# Every response carries ``raw``: its exact bytes, so a reply can be relayed verbatim.


class ValueItem(msgspec.Struct, gc=False):
    """One VALUE of a get/gets/gat/gats answer (cas only for gets/gats)."""

    key: bytes
    flags: int
    value: bytes
    cas: int | None = None


class Values(msgspec.Struct, gc=False):
    """The VALUE items of a retrieval, up to and including END."""

    items: list[ValueItem]
    raw: bytes = b""


class Status(msgspec.Struct, gc=False):
    """A one-word answer: STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED, TOUCHED, OK, RESET."""

    code: bytes
    raw: bytes = b""


class Number(msgspec.Struct, gc=False):
    """incr/decr result."""

    value: int
    raw: bytes = b""


class VersionInfo(msgspec.Struct, gc=False):
    version: bytes
    raw: bytes = b""


class StatsReport(msgspec.Struct, gc=False):
    """STAT lines up to END, as (name, value) in the order received."""

    stats: list[tuple[bytes, bytes]]
    raw: bytes = b""


class MetaResponse(msgspec.Struct, gc=False):
    """VA/HD/EN/NF/NS/EX/MN with its return flags; ``value`` only for VA."""

    code: bytes
    flags: dict[str, bytes] = msgspec.field(default_factory=dict)
    value: bytes | None = None
    raw: bytes = b""

    @property
    def key(self) -> bytes | None:
        """The k flag, base64-decoded when the response also carries b."""
        key = self.flags.get("k")
        if key is not None and "b" in self.flags:
            return binascii.a2b_base64(key)
        return key

    @property
    def opaque(self) -> bytes | None:
        return self.flags.get("O")

    @property
    def cas(self) -> int | None:
        return self._int("c")

    @property
    def client_flags(self) -> int | None:
        return self._int("f")

    @property
    def ttl(self) -> int | None:
        """Remaining TTL in seconds, -1 for never."""
        return self._int("t")

    @property
    def size(self) -> int | None:
        return self._int("s")

    @property
    def won(self) -> bool:
        return "W" in self.flags

    @property
    def stale(self) -> bool:
        return "X" in self.flags

    @property
    def win_sent(self) -> bool:
        return "Z" in self.flags

    def _int(self, flag: str) -> int | None:
        token = self.flags.get(flag)
        return None if token is None else int(token)


class MetaDebugInfo(msgspec.Struct, gc=False):
    """ME <key> <k>=<v>*; a miss is a MetaResponse with code EN."""

    key: bytes
    info: dict[bytes, bytes]
    raw: bytes = b""


class ErrorResponse(msgspec.Struct, gc=False):
    """ERROR, CLIENT_ERROR <msg> or SERVER_ERROR <msg>; ``raw`` includes any VALUE/STAT
    lines the backend sent before failing."""

    kind: bytes
    message: bytes = b""
    raw: bytes = b""


Response: TypeAlias = (
    Values | Status | Number | VersionInfo | StatsReport | MetaResponse | MetaDebugInfo | ErrorResponse
)
