"""The NATS client protocol, the part the journal's publish link speaks: bytes in, events out.

No sockets here (see link.py for the trio connection around it). Outbound: CONNECT,
SUB, PING/PONG, PUB/HPUB. Inbound: INFO, MSG, HMSG, PING, PONG, +OK, -ERR — the
server sends nothing else to a client. Anything that does not parse is a `WireError`;
the link drops the connection then, as nats-py does, since a byte stream that lost
its framing cannot be resynchronised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

HEADER_LINE: Final = b"NATS/1.0\r\n"
MAX_CONTROL_LINE: Final = 4096  # the server's own default limit for a protocol line
MAX_PAYLOAD: Final = 64 * 1024 * 1024  # the server's hard ceiling for max_payload
CRLF: Final = b"\r\n"
PING: Final = b"PING\r\n"
PONG: Final = b"PONG\r\n"


class WireError(Exception):
    """The server's byte stream does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class Info:
    fields: dict[str, Any]


@dataclass(slots=True)  # not frozen: built once per reply, and a frozen __init__ costs twice as much
class ServerMessage:
    subject: bytes
    sid: int
    reply: bytes
    headers: bytes | None  # the raw header block (b"NATS/1.0 503\r\n..."), None for a MSG
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class ServerError:
    message: str


Event = Info | ServerMessage | Ping | Pong | Ok | ServerError

_PING, _PONG, _OK = Ping(), Pong(), Ok()


# --- outbound ----------------------------------------------------------------------


class HeaderError(ValueError):
    """A header that would break out of its line: never sent."""


_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII but ':' (RFC 7230 token-ish), no space


def unsafe_header(headers: dict[str, str]) -> str | None:
    """The name of the first header that could forge another header line (CR/LF in its value, or a
    name that is not a plain token), or None. Fronts validate client strings first; this is the
    second line of defence, checked for every write before it reaches a shared batch."""
    for name, value in headers.items():
        if "\r" in value or "\n" in value or not _HEADER_NAME.fullmatch(name):
            return name
    return None


def encode_headers(headers: dict[str, str] | None) -> bytes:
    if not headers:
        return b""
    bad = unsafe_header(headers)
    if bad is not None:
        raise HeaderError(f"header {bad[:40]!r}: CR/LF in the value or an invalid name")
    if len(headers) == 1 and "Nats-Msg-Id" in headers:  # nearly every journal write: skip the generic join
        return b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % headers["Nats-Msg-Id"].encode()
    lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return HEADER_LINE + lines.encode() + CRLF


def encode_publish(subject: str, reply: bytes, headers: dict[str, str] | None, payload: bytes) -> bytes:
    """One HPUB (or PUB, without headers) command, ready for the socket."""
    header_block = encode_headers(headers)
    reply_part = b" " + reply if reply else b""
    if header_block:
        size = len(header_block)
        return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (
            subject.encode(), reply_part, size, size + len(payload), header_block, payload
        )
    return b"PUB %s%s %d\r\n%s\r\n" % (subject.encode(), reply_part, len(payload), payload)


def encode_same_to_each(subjects: list[bytes], payload: bytes) -> bytes:
    """One PUB of `payload` to each subject (acks: "+ACK" to many reply subjects), in one buffer."""
    size = len(payload)
    return b"".join([b"PUB %s %d\r\n%s\r\n" % (subject, size, payload) for subject in subjects])


def encode_connect(options: dict[str, Any]) -> bytes:
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + CRLF


def encode_sub(subject: str, sid: int) -> bytes:
    return b"SUB %s %d\r\n" % (subject.encode(), sid)


def encode_unsub(sid: int) -> bytes:
    return b"UNSUB %d\r\n" % sid


def status_of(headers: bytes | None) -> bytes:
    """The inline status of a reply's header block ("NATS/1.0 503\\r\\n..." -> b"503"), or b""."""
    if headers and headers.startswith(b"NATS/1.0 "):
        return headers[9:12]
    return b""


# --- inbound -----------------------------------------------------------------------


class ClientParser:
    """Feed it what the socket gave; take events until `next_event()` says None (needs more bytes)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = b""  # bytes, not bytearray: each slice taken out is then one copy, not two
        self._pos = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos < len(self._buffer):
            self._buffer = self._buffer[self._pos :] + bytes(data)
        else:
            self._buffer = bytes(data)
        self._pos = 0

    def next_event(self) -> Event | None:
        buffer, pos = self._buffer, self._pos
        end = buffer.find(CRLF, pos)
        if end < 0:
            if len(buffer) - pos > MAX_CONTROL_LINE:
                raise WireError(f"protocol line longer than {MAX_CONTROL_LINE} bytes")
            return None
        if end - pos > MAX_CONTROL_LINE:
            raise WireError(f"protocol line longer than {MAX_CONTROL_LINE} bytes")
        line = buffer[pos:end]
        if line.startswith(b"MSG "):  # nearly everything a publisher hears: skip the generic dispatch
            return self._message(False, line[4:], end + 2)
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op in (b"MSG", b"HMSG"):
            return self._message(op == b"HMSG", rest, end + 2)
        self._pos = end + 2
        if op == b"PING":
            return _PING
        if op == b"PONG":
            return _PONG
        if op == b"+OK":
            return _OK
        if op == b"-ERR":
            return ServerError(rest.strip().strip(b"'").decode("utf-8", "replace"))
        if op == b"INFO":
            try:
                fields = json.loads(rest)
            except ValueError as exc:
                raise WireError(f"INFO is not JSON: {exc}") from None
            if not isinstance(fields, dict):
                raise WireError("INFO is not a JSON object")
            return Info(fields)
        raise WireError(f"unknown protocol operation {line[:40]!r}")

    def _message(self, with_headers: bool, args: bytes, body_start: int) -> ServerMessage | None:
        parts = args.split()
        try:
            if with_headers:
                if len(parts) not in (4, 5):
                    raise ValueError
                header_size, total = int(parts[-2]), int(parts[-1])
            else:
                if len(parts) not in (3, 4):
                    raise ValueError
                header_size, total = 0, int(parts[-1])
            sid = int(parts[1])
        except ValueError:
            raise WireError(f"malformed {'HMSG' if with_headers else 'MSG'} line: {args[:80]!r}") from None
        if not 0 <= header_size <= total <= self.max_payload or sid < 0:
            raise WireError(f"message sizes out of range: headers {header_size}, total {total}")
        body_end = body_start + total
        if len(self._buffer) < body_end + 2:
            return None  # the body has not all arrived
        if self._buffer[body_end : body_end + 2] != CRLF:
            raise WireError("message body is not followed by CRLF")
        reply = parts[2] if len(parts) == (5 if with_headers else 4) else b""
        headers = self._buffer[body_start : body_start + header_size] if with_headers else None
        payload = self._buffer[body_start + header_size : body_end]
        self._pos = body_end + 2
        return ServerMessage(parts[0], sid, reply, headers, payload)
