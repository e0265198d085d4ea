"""A KV request's body: received within the listener's byte limits, gzip undone off the loop.

`max_body` bounds one request; the listener's `partial_budget` bounds the large bodies all its
connections hold at once (received, and then decoded and journaled until the answer is sent),
as it bounds partly received values on the memcached and CQL fronts. A body of 64 KiB or more
reserves its room before it is read (its Content-Length, or piece by piece when it is chunked);
with no room within `partial_wait` the request is answered 503 with Retry-After, unread.
Smaller bodies arrive within a read or two, and the connection cap bounds them.
"""

from __future__ import annotations

import zlib
from typing import Final

from sidecar.http import Receive
from sidecar.logs import get_logger
from sidecar.offload import OFF_LOOP_BYTES, off_loop
from sidecar.tcp import ByteBudget

log = get_logger("kv")

LARGE_BODY: Final = 64 * 1024


class HttpError(Exception):
    def __init__(self, status: int, error: str, field: str = "") -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


class BodyRoom:
    """The room one request holds in its listener's body budget; released once it is answered."""

    def __init__(self, budget: ByteBudget | None, wait: float) -> None:
        self.budget = budget
        self.wait = wait
        self.held = 0

    async def hold(self, size: int) -> None:
        """Room for `size` bytes of this request in all (one request may take the whole budget)."""
        if self.budget is None or size < LARGE_BODY:
            return
        want = min(size, self.budget.limit) - self.held
        if want <= 0:
            return
        got = await self.budget.acquire(want, self.wait)
        if not got:
            log.warning("partial_budget_exhausted", length=size, budget=self.budget.limit,
                        refused=self.budget.refused)
            raise HttpError(503, f"the listener holds its partial_budget of {self.budget.limit} bytes in request "
                                 "bodies: retry shortly")
        self.held += got

    def release(self) -> None:
        if self.budget is not None:
            self.budget.release(self.held)
        self.held = 0


async def read_body(receive: Receive, headers: dict[bytes, bytes], max_body: int, room: BodyRoom,
                    inflate: bool = False) -> bytes | bytearray:
    """The request body, at most `max_body` bytes (after gzip, when `inflate`); 413 beyond it."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit():
        if int(declared) > max_body:
            raise HttpError(413, f"request body over {max_body} bytes")
        await room.hold(int(declared))
    # Grown a received piece at a time: joining 15 MiB of pieces at the end would be one long
    # step of the loop. The decoders read a bytearray as it is.
    body: bytes | bytearray = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > max_body:
            raise HttpError(413, f"request body over {max_body} bytes")
        await room.hold(len(body) + len(chunk))
        if not body:
            body = chunk  # the usual case: the whole body in one piece, not copied
        else:
            if isinstance(body, bytes):
                body = bytearray(body)
            body += chunk
        if not message.get("more_body", False):
            break
    encoding = headers.get(b"content-encoding", b"identity").strip().lower() if inflate else b"identity"
    if encoding == b"gzip":
        return await _gunzip(body, max_body, room)
    if encoding not in (b"identity", b""):
        raise HttpError(415, f"unsupported content-encoding {encoding.decode(errors='replace')}")
    return body


async def _gunzip(compressed: bytes | bytearray, max_body: int, room: BodyRoom) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    try:
        if len(compressed) < OFF_LOOP_BYTES:
            body = inflater.decompress(compressed, max_body + 1)
        else:  # zlib lets go of the GIL: in a thread, the loop serves others meanwhile
            body = await off_loop(lambda: inflater.decompress(compressed, max_body + 1))
    except zlib.error as exc:
        raise HttpError(400, f"bad gzip body: {exc}") from None
    if len(body) > max_body or inflater.unconsumed_tail:
        raise HttpError(413, f"request body over {max_body} bytes once decompressed")
    # Held once known: while inflating, the overshoot is one body per worker thread (two) or on the loop.
    await room.hold(len(compressed) + len(body))
    return body
