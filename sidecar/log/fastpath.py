"""A pipelined publish/ack path underneath nats-py's per-message API.

nats-py builds a Msg object, parses headers, queues it and switches tasks for every
inbound message, and validates and re-encodes every outbound one: ~15 µs a message,
which caps the journal far below what the server takes. The journal writer only
needs "append these HPUB commands" and "tell me each reply to my ack inbox", so
this module does exactly that against three nats-py internals:

- ``Client._pending`` / ``_pending_data_size`` / ``_flush_pending()`` — the outbound buffer
- ``Client._process_msg`` — where the protocol parser hands every MSG/HMSG (the journal's acks,
  the drain's pulled messages)

They are checked when the writer starts; when a nats-py release changes them,
`supported()` is false and the writer falls back to the public API (slower, same
semantics). Both paths are exercised by the tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

HEADER_LINE = b"NATS/1.0\r\n"

RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]  # (subject, reply, data, headers)


def supported(nc: Any) -> bool:
    return all(hasattr(nc, name) for name in ("_pending", "_pending_data_size", "_flush_pending", "_process_msg"))


def encode_headers(headers: dict[str, str] | None) -> bytes:
    if not headers:
        return b""
    if len(headers) == 1 and "Nats-Msg-Id" in headers:  # nearly every journal write: skip the generic join
        return b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % headers["Nats-Msg-Id"].encode()
    lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return HEADER_LINE + lines.encode() + b"\r\n"


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


def append_commands(nc: Any, commands: list[bytes], size: int) -> Awaitable[Any]:
    """Queue commands on the client's outbound buffer; the returned awaitable kicks its flusher."""
    nc._pending.extend(commands)
    nc._pending_data_size += size
    return nc._flush_pending()


def route(nc: Any, sid: int, handler: RawHandler) -> None:
    """Deliver every message of subscription `sid` to `handler(subject, reply, data, headers)` directly.

    Several subscriptions can be routed; one dispatch table per client."""
    routes: dict[int, RawHandler] | None = getattr(nc, "_walcar_routes", None)
    if routes is None:
        routes = nc._walcar_routes = {}
        original = nc._process_msg

        async def dispatch(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            target = routes.get(msg_sid)
            if target is not None:
                target(subject, reply, data, headers)
                return
            await original(msg_sid, subject, reply, data, headers)

        nc._process_msg = dispatch
    routes[sid] = handler


def unroute(nc: Any, sid: int) -> None:
    routes = getattr(nc, "_walcar_routes", None)
    if routes is not None:
        routes.pop(sid, None)
