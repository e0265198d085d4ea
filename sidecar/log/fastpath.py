"""A receive path underneath nats-py's per-message API, for the replay's reader.

nats-py builds a Msg object, parses headers, queues it and switches tasks for every
inbound message: ~15 µs a message.
The replay's reader only needs "tell me each message of this subscription", so this
module does exactly that against one nats-py internal (the journal writer and the
drain use the sidecar's trio connection instead: link.py): ``Client._process_msg``,
where the protocol parser hands every MSG/HMSG.

It is checked before use; when a nats-py release changes it, `supported()` is
false and the callers fall back to nats-py's public API (slower, same semantics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["route", "supported", "unroute"]

RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]  # (subject, reply, data, headers)


def supported(nc: Any) -> bool:
    return hasattr(nc, "_process_msg")


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
