"""A pipelined publish/receive path underneath nats-py's per-message API.

nats-py builds a Msg object, parses headers, queues it and switches tasks for every
inbound message, and validates and re-encodes every outbound one: ~15 µs a message.
The replay's reader and the fire-and-forget notices only need "append these commands"
and "tell me each message of this subscription", so this module does exactly that
against three nats-py internals (the journal writer and the drain use the sidecar's
trio connection instead: link.py):

- ``Client._pending`` / ``_pending_data_size`` / ``_flush_pending()`` — the outbound buffer
- ``Client._process_msg`` — where the protocol parser hands every MSG/HMSG (the replay's
  pulled messages)

They are checked before use; when a nats-py release changes them, `supported()` is
false and the callers fall back to nats-py's public API (slower, same semantics).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.log.wire import encode_publish

__all__ = ["append_commands", "encode_publish", "route", "supported", "unroute"]

RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]  # (subject, reply, data, headers)


def supported(nc: Any) -> bool:
    return all(hasattr(nc, name) for name in ("_pending", "_pending_data_size", "_flush_pending", "_process_msg"))


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
