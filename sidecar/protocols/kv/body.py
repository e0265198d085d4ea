"""A KV request's body: received within the listener's byte limits, gzip undone a piece at a time.

`max_body` bounds one request; the listener's `partial_budget` bounds the large bodies all its
connections hold at once (received, and then decoded and journaled until the answer is sent),
as it bounds partly received values on the memcached and CQL fronts. A body of 64 KiB or more
reserves twice its size before it is read (the body and the values decoded from it: a 30 MiB
body took 60 MiB), from its Content-Length or piece by piece when it is chunked; with no room
within `partial_wait` the request is answered 503 with Retry-After, unread. Smaller bodies arrive
within a read or two, and the connection cap bounds them. Once decoded, a request also holds
ENTRY_BYTES for each entry it makes (app.py). So `max_body` is at most half the budget, and only
a request holding nothing yet waits for room: one that needs more while it holds some is 503 at once.
A gzip body (any route, `Content-Encoding: gzip`) holds its inflated size too, charged as it grows.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Final

import msgspec
import trio

from sidecar.http import Receive
from sidecar.logs import get_logger
from sidecar.tcp import ByteBudget

log = get_logger("kv")

_FIELD_RE = re.compile(r" - at `\$(.*)`$")
_UNKNOWN_FIELD_RE = re.compile(r"unknown field `([^`]*)`")

LARGE_BODY: Final = 64 * 1024
# gzip is inflated this much at a time (~0.3 ms of the loop each).
INFLATE_PIECE: Final = 256 * 1024
# What one entry of a request costs while it is decoded, built, encoded, journaled and answered
# (its model, Entry, encoded message, write and result; values apart). A 63 KiB JSON batch
# of 2,500 entries is ~3 MB of objects: the request holds this much per entry, beside its body.
ENTRY_BYTES: Final = 1024


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

    def _want(self, size: int) -> int:
        if self.budget is None or size < LARGE_BODY:
            return 0
        return max(0, min(size, self.budget.limit) - self.held)

    def try_hold(self, size: int) -> bool:
        """`hold` without waiting: False when it would have to wait."""
        want = self._want(size)
        if want and not self.budget.try_acquire(want):  # type: ignore[union-attr]
            return False
        self.held += want
        return True

    async def hold(self, size: int) -> None:
        """Room for `size` bytes of this request in all (one request may take the whole budget).

        Only a request that holds nothing yet waits for room: two that each held part of the budget
        and waited for more would keep each other waiting until partial_wait ran out, both refused."""
        want = self._want(size)
        if not want:
            return
        assert self.budget is not None
        if self.held:
            got = want if self.budget.try_acquire(want) else 0
            self.budget.refused += not got
        else:
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


def _field_of(exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "Expected `str`, got `int` - at `$.items[0].key`" -> ("items[0].key", message)."""
    text = str(exc)
    match = _FIELD_RE.search(text)
    path, message = (match.group(1).lstrip("."), text[: match.start()]) if match else ("", text)
    unknown = _UNKNOWN_FIELD_RE.search(message)
    if unknown:  # the path points at the object; name the field itself
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path, message


def decode(body: bytes | bytearray, kind: Any, msgpack: bool) -> Any:
    """The request as `kind`; 400 naming the field that does not fit."""
    try:
        if msgpack:
            return msgspec.msgpack.decode(body, type=kind)
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        field, message = _field_of(exc)
        raise HttpError(400, message, field) from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"malformed {'msgpack' if msgpack else 'JSON'} body: {exc}") from None


async def read_body(receive: Receive, headers: dict[bytes, bytes], max_body: int,
                    room: BodyRoom) -> bytes | bytearray:
    """The request body, at most `max_body` bytes (after gzip); 413 beyond it."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit():
        if int(declared) > max_body:
            raise HttpError(413, f"request body over {max_body} bytes")
        await room.hold(2 * int(declared))  # the body, and the values decoded from it
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
        await room.hold(2 * (len(body) + len(chunk)))
        if not body:
            body = chunk  # the usual case: the whole body in one piece, not copied
        else:
            if isinstance(body, bytes):
                body = bytearray(body)
            body += chunk
        if not message.get("more_body", False):
            break
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding == b"gzip":
        return await _gunzip(body, max_body, room)
    if encoding not in (b"identity", b""):
        raise HttpError(415, f"unsupported content-encoding {encoding.decode(errors='replace')}")
    return body


async def _gunzip(compressed: bytes | bytearray, max_body: int, room: BodyRoom) -> bytes | bytearray:
    """Inflated a piece at a time, each charged to the budget before it is made: a 32 KiB body can
    inflate to 32 MiB, and in one call that was ~90 ms of the loop, held before it was charged."""
    inflater = zlib.decompressobj(wbits=31)
    body = bytearray()
    pending: bytes | bytearray = compressed
    while True:
        await room.hold(len(compressed) + 2 * (len(body) + INFLATE_PIECE))
        try:
            piece = inflater.decompress(pending, INFLATE_PIECE)
        except zlib.error as exc:
            raise HttpError(400, f"bad gzip body: {exc}") from None
        body += piece
        if len(body) > max_body:
            raise HttpError(413, f"request body over {max_body} bytes once decompressed")
        pending = inflater.unconsumed_tail
        if not pending and len(piece) < INFLATE_PIECE:  # all input read and nothing more held back
            return body
        await trio.lowlevel.checkpoint()
