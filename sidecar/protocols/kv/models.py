"""Wire structs of the key-value API (JSON or msgpack, by Content-Type).

Modelled on Netflix's WAL (WriteToLog) and KV (PutItems, DeleteItems, MutateItems)
APIs. Binary fields (`payload`, `value`) are base64 in JSON and raw bytes in msgpack;
`text` is a UTF-8 convenience for either.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from sidecar.envelope import Entry
from sidecar.ingress import Durable


# The structs are `gc=False`: they hold strings, bytes, numbers and each other, never a cycle, and a batch
# decodes and answers thousands of them at once — tracked, each would be walked by the cyclic GC's passes.
class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True, gc=False):
    pass


# Bounds the decoder enforces (400 naming the field): beyond them a value could only overflow.
# A delay is also refused beyond the namespace's replay_window (the API checks that).
MAX_DELAY_MS: Final = 100 * 365 * 24 * 3600 * 1000
MAX_TTL_S: Final = 20 * 365 * 24 * 3600  # Cassandra's own largest TTL (20 years)


class Lifecycle(_Strict):
    # deliver no earlier than this many ms from now
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_DELAY_MS)] = 0
    write_time: int | None = None  # µs since the epoch; default: the sidecar's clock


class WriteToLog(_Strict):
    key: str
    payload: bytes | None = None
    text: str | None = None
    target: list[str] | None = None  # a subset of the namespace's targets; default all
    lifecycle: Lifecycle | None = None
    idempotency_token: str | None = None
    content_type: str = ""


class Item(_Strict):
    key: str
    value: bytes | None = None
    text: str | None = None
    ttl_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_TTL_S)] = 0  # seconds; 0: no expiry


class PutItems(_Strict):
    items: list[Item]
    lifecycle: Lifecycle | None = None
    idempotency_token: str | None = None


class DeleteItems(_Strict):
    item_keys: list[str] | None = None  # absent: delete the whole record
    lifecycle: Lifecycle | None = None
    idempotency_token: str | None = None


class Mutation(_Strict):
    op: Literal["put", "delete"]
    id: str
    items: list[Item] | None = None  # put
    item_keys: list[str] | None = None  # delete; absent: the whole record


class MutateItems(_Strict):
    mutations: list[Mutation]
    lifecycle: Lifecycle | None = None
    idempotency_token: str | None = None


class WriteResponse(msgspec.Struct, kw_only=True, gc=False):
    durable: Durable
    visible: bool = False
    message: str = ""
    sequence: int = 0
    duplicate: bool = False


class LogResult(WriteResponse, kw_only=True):
    """One entry of a WriteToLog batch: the status a single write would have got (200 durable;
    400/404/409/413 refused, with `field`; 503 not durable), and the single write's answer."""

    status: int = 200
    field: str = ""


class LogBatchResponse(msgspec.Struct, kw_only=True, gc=False):
    results: list[LogResult]  # in the order of the request's entries


class ErrorResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    error: str
    field: str = ""
    durable: Durable | None = None


class ItemOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    key: str
    value: bytes
    expires_at: int = 0


class GetItemsResponse(msgspec.Struct, kw_only=True):
    id: str
    items: list[ItemOut]


class ReplicationBatch(msgspec.Struct, kw_only=True, gc=False):
    """Entries drained from another region's journal: journaled here as they are (id, write time, origin)."""

    entries: list[Entry]


class ReplicatedResult(WriteResponse, kw_only=True):
    # True when this region will never journal the entry (the reason is `message`): the sending
    # region dead-letters it instead of retrying. Absent from older walcars: False.
    refused: bool = False


class ReplicationResponse(msgspec.Struct, kw_only=True, gc=False):
    results: list[ReplicatedResult]
