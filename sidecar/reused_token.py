"""A write JetStream found stored already (its id was used before): a retry, or another write?

Entry ids derive from the client's idempotency token, so JetStream answers `duplicate` for a
retried request and for a different request under a reused token alike. Acking the second as
durable would tell the client a write is stored that never was; so on this rare path (a
duplicate) the stored entries are read back and compared with the request's, all but the
times each request assigns afresh (write time, expiry, delivery time): one entry, a mutation
stored as one MULTI object, or an atomic batch whose every id is stored (one whose ids are only
partly stored is a 409 already: sidecar.log.journal).

What was stored can be gone by the time of the retry (a chunk deleted once every target
applied it, a message past the stream's limits): then there is nothing to compare and the
duplicate stands, as JetStream answered it. A read that fails for another reason answers
durable `unknown`: the client retries with the same token.

A retried batch holds thousands of tokened entries, each its own duplicate: they are read back
`READ_BACKS_AT_ONCE` at a time, not one after another (10,000 took 7.5 s one at a time).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
import trio

from sidecar.config import stream_name
from sidecar.envelope import Entry, Op, decode
from sidecar.log.connection import JetStreamApiError
from sidecar.log.journal import Journal
from sidecar.log.payloads import PayloadError, expand_multi, with_payload
from sidecar.log.writer import Durable, WriteResult
from sidecar.logs import get_logger

log = get_logger("sidecar.ingress")

NO_MESSAGE_FOUND = 10037  # JetStream's err_code for a sequence no longer in the stream
# Stored writes read back at once for one request: each read holds one (its message, or a chunked value or
# MULTI object read whole, at most max_item_size), so this bounds what a retried batch holds beside its body.
READ_BACKS_AT_ONCE = 8

T = TypeVar("T")
R = TypeVar("R")


class _Gone(Exception):
    """What was stored under the id is no longer there to compare."""


async def check_duplicate(journal: Journal, entries: list[Entry], stored_id: str, result: WriteResult) -> WriteResult:
    """`result` as it is, unless it is a duplicate stored for a different write (then a 409
    conflict) or one that cannot be read back to tell (then durable unknown: retry the token).
    `stored_id` is the id the duplicate was found under: the entry's, or the MULTI marker's."""
    if not (result.ok and result.duplicate and (result.sequence or result.stored_at)):
        return result
    namespace = entries[0].ns
    try:
        if result.stored_at:  # an atomic batch: entry by entry, each under its own id
            pieces = await _at_once(lambda pair: _stored_entries(journal, namespace, pair[1], pair[0].id),
                                    list(zip(entries, result.stored_at, strict=True)))
            stored = None if any(p is None for p in pieces) else [e for p in pieces for e in p or ()]
        else:
            stored = await _stored_entries(journal, namespace, result.sequence, stored_id)
    except _Gone as exc:
        log.info("duplicate_not_compared", namespace=namespace, sequence=result.sequence, reason=str(exc))
        return result
    except (JetStreamApiError, PayloadError, msgspec.DecodeError, KeyError, OSError, TimeoutError) as exc:
        log.warning("duplicate_unverified", namespace=namespace, sequence=result.sequence,
                    error=f"{type(exc).__name__}: {exc}")
        return WriteResult(Durable.UNKNOWN, message="the token names a stored write that could not be read back "
                                                    "to compare: retry with the same token")
    if stored is None or _comparable(stored) == _comparable(entries):
        return result
    where = f"sequences {result.stored_at[0]}..." if result.stored_at else f"sequence {result.sequence}"
    return WriteResult(Durable.FALSE, conflict=True, message=(
        f"idempotency token reused for a different write: the write stored under it ({where}, "
        f"{len(stored)} entries) differs from this one ({len(entries)} entries); "
        "nothing of this one is stored: send it under a new token"))


async def check_duplicates(journal: Journal, entries: Sequence[Entry], results: list[WriteResult]) -> None:
    """`check_duplicate` for every duplicate among independent writes (a batch), in place."""
    places = [index for index, result in enumerate(results) if result.duplicate]
    if not places:  # nearly every batch: no nursery
        return
    checked = await _at_once(lambda i: check_duplicate(journal, [entries[i]], entries[i].id, results[i]), places)
    for index, result in zip(places, checked, strict=True):
        results[index] = result


async def _at_once(read: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R]:
    """`read(item)` of each item, in order, READ_BACKS_AT_ONCE running at a time; the failure of the first item
    that failed raised as it is (not in an ExceptionGroup: callers catch the read's own errors)."""
    answers: list[R | None] = [None] * len(items)
    failures: list[tuple[int, Exception]] = []
    work = iter(range(len(items)))

    async def worker() -> None:
        for index in work:
            if failures:
                return
            try:
                answers[index] = await read(items[index])
            except Exception as exc:
                failures.append((index, exc))

    async with trio.open_nursery() as nursery:
        for _ in range(min(READ_BACKS_AT_ONCE, len(items))):
            nursery.start_soon(worker)
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return answers  # type: ignore[return-value]


async def _stored_entries(journal: Journal, namespace: str, sequence: int, stored_id: str) -> list[Entry] | None:
    """The entries stored at `sequence` under `stored_id`, values included; None when that message
    is not stored under that id (then there is nothing of this write's to compare with)."""
    try:
        reply = await journal.writer.conn.js_api(f"STREAM.MSG.GET.{stream_name(namespace)}", {"seq": sequence})
    except JetStreamApiError as exc:
        if exc.err_code == NO_MESSAGE_FOUND:
            raise _Gone(f"sequence {sequence} is no longer in the stream") from None
        raise
    stored = decode(base64.b64decode(reply["message"].get("data") or ""))
    if stored.id != stored_id:
        return None
    try:
        if stored.op is Op.MULTI:
            return await expand_multi(journal.chunks, stored)
        return [await with_payload(journal.chunks, stored)]
    except PayloadError as exc:
        if exc.permanent:
            raise _Gone(exc.message) from None
        raise


def _comparable(entries: list[Entry]) -> list[Entry]:
    """The entries without what each request assigns anew, so a retry of the same request compares equal."""
    return [msgspec.structs.replace(e, write_time=0, expires_at=0, deliver_at=0, seq=0, chunk=None) for e in entries]
