"""A mutation journaled as one MULTI object whose token was used before: a retry, or another mutation?

An atomic batch tells the two apart by its entry ids (every id stored: a retry; some: a
different mutation, HTTP 409). A mutation over the batch limits is one marker on the stream
whose id is the token alone, so JetStream answers `duplicate` whatever the entries are. Acking
that as durable would tell the client a mutation is stored that never was; so the stored
marker's entries are read back and compared with this request's, all but the times each request
assigns afresh (write time, expiry, delivery time). Only on this rare path: a duplicate MULTI.
"""

from __future__ import annotations

import base64

import msgspec

from sidecar.config import stream_name
from sidecar.envelope import Entry, Op, decode
from sidecar.log.connection import JetStreamApiError
from sidecar.log.journal import Journal
from sidecar.log.payloads import PayloadError, expand_multi
from sidecar.log.writer import Durable, WriteResult
from sidecar.logs import get_logger

log = get_logger("sidecar.ingress")


async def check_multi_duplicate(journal: Journal, entries: list[Entry], mutation_id: str,
                                result: WriteResult) -> WriteResult:
    """`result` as it is, unless it is a duplicate MULTI marker stored for different entries (then a
    409 conflict) or one that cannot be read back to tell (then durable unknown: retry the token)."""
    if not (result.ok and result.duplicate and result.sequence and len(entries) > 1):
        return result
    namespace = entries[0].ns
    try:
        reply = await journal.writer.conn.js_api(f"STREAM.MSG.GET.{stream_name(namespace)}", {"seq": result.sequence})
        marker = decode(base64.b64decode(reply["message"].get("data") or ""))
        if marker.op is not Op.MULTI or marker.id != mutation_id:
            return result  # an atomic batch's duplicate (ids compared already), not a MULTI marker
        stored = await expand_multi(journal.chunks, marker)
    except (JetStreamApiError, PayloadError, msgspec.DecodeError, KeyError, OSError, TimeoutError) as exc:
        log.warning("multi_duplicate_unverified", namespace=namespace, sequence=result.sequence,
                    error=f"{type(exc).__name__}: {exc}")
        return WriteResult(Durable.UNKNOWN, message="the token names a stored mutation that could not be read back "
                                                    "to compare: retry with the same token")
    if _comparable(stored) == _comparable(entries):
        return result
    return WriteResult(Durable.FALSE, conflict=True, message=(
        f"idempotency token reused for a different mutation: the mutation stored under it (sequence "
        f"{result.sequence}, {len(stored)} entries) differs from this one ({len(entries)} entries); "
        "nothing of this one is stored: send it under a new token"))


def _comparable(entries: list[Entry]) -> list[Entry]:
    """The entries without what each request assigns anew, so a retry of the same request compares equal."""
    return [msgspec.structs.replace(e, write_time=0, expires_at=0, deliver_at=0, seq=0) for e in entries]
