"""The journaled entry: what one mutation looks like on the stream (msgpack).

Versioned by `v`; fields are only ever added with defaults, and decoding ignores
fields it does not know, so entries written by an older or newer walcar stay
readable for the whole replay window.

The structs are `gc=False`: they hold only strings, bytes, numbers, lists of those and each
other, never a cycle, and a drainer holds tens of thousands of them at once — tracked,
they would make every collection of the cyclic GC walk all of them.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
import zlib
from enum import StrEnum
from typing import Final

import msgspec

ENVELOPE_VERSION: Final = 1


class Op(StrEnum):
    PUT = "put"  # set an item (memcached set, KV put, WriteToLog)
    DELETE = "delete"  # delete an item, or a whole record when item is ""
    TOUCH = "touch"  # change an item's expiry only
    CQL = "cql"  # re-execute CQL statement(s) against Cassandra
    MULTI = "multi"  # marker: a mutation too large for one atomic batch, stored in the chunk store


class ChunkRef(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Where a payload too large for the stream lives (the namespace's chunk bucket)."""

    object: str
    size: int
    chunks: int
    digest: str  # "sha256=<hex>" of the whole payload, checked on read


class BatchRef(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Membership of a multi-entry mutation journaled as one atomic batch."""

    id: str
    index: int
    count: int


class CqlStatement(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Everything needed to re-execute one CQL mutation with cassandra-driver."""

    query: str
    values: list[bytes | None] = []  # serialized bind values as the client sent them; None = null
    types: list[str] = []  # CQL type of each bind marker (from the prepared metadata), for display
    keyspace: str = ""
    unset: list[int] = []  # positions of "unset" values (protocol v4 `-2`)
    names: list[str] = []  # bind-marker names when the client bound by name


class CqlMutation(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    statements: list[CqlStatement]
    batch_type: int = -1  # -1: a single statement; 0 logged, 1 unlogged (CQL BATCH)
    consistency: int = 0x0006  # LOCAL_QUORUM
    serial_consistency: int = 0


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    v: int = ENVELOPE_VERSION
    id: str  # idempotency token: the Nats-Msg-Id
    ns: str
    op: Op
    key: str  # the record id / memcached key: decides the partition and the per-key order
    partition: int
    item: str = ""  # item key inside a record (KV API); "" means the record itself
    value: bytes | None = None
    chunk: ChunkRef | None = None  # set instead of value when the payload is in the chunk store
    content_type: str = ""
    flags: int = 0  # memcached client flags
    expires_at: int = 0  # absolute unix seconds; 0: never
    write_time: int  # µs since the epoch; Cassandra's write timestamp on every apply
    deliver_at: int = 0  # µs since the epoch; 0: now
    origin: str = ""  # region the write entered walcar
    targets: list[str] = []  # [] means every target of the namespace
    cql: CqlMutation | None = None
    batch: BatchRef | None = None
    # The entry's journal (stream) sequence, set by whoever read it from the stream (drain, replay) for
    # targets that pass it on; never journaled: 0 is the default and omitted, and nothing encodes it set.
    seq: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)
_list_decoder = msgspec.msgpack.Decoder(list[Entry])


def encode(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode(data: bytes) -> Entry:
    return _decoder.decode(data)


def encode_many(entries: list[Entry]) -> bytes:
    return _encoder.encode(entries)


def decode_many(data: bytes) -> list[Entry]:
    return _list_decoder.decode(data)


# A journal message holds one entry (a msgpack map) or a pack of them (a msgpack array of maps): the
# journal writer packs entries of one partition queued in the same group commit (sidecar/log/writer.py),
# each of a different key, so a key's entries are still one per message and in stream order.
MAX_PACK_ENTRIES = 64
MAX_PACK_BYTES = 256 * 1024
MAX_PACKED_ENTRY_BYTES = 16 * 1024  # larger entries go alone: a pack's members stay close in size


def is_pack(data: bytes) -> bool:
    """Whether a journal message is a pack (an array) rather than one entry (a map)."""
    return bool(data) and (0x90 <= data[0] <= 0x9F or data[0] in (0xDC, 0xDD))


def pack_payload(payloads: list[bytes]) -> bytes:
    """A pack from already-encoded entries: an array header before them, nothing re-encoded."""
    count = len(payloads)
    head = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
    return head + b"".join(payloads)


_pieces_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])


def decode_pieces(pack: bytes) -> list[tuple[bytes, Entry]]:
    """A pack's entries, each with its own encoded bytes (what it costs to hold, what its dead letter holds)."""
    return [(bytes(raw), _decoder.decode(raw)) for raw in _pieces_decoder.decode(pack)]


def decode_message(data: bytes) -> list[Entry]:
    """The entries of one journal message, one or a pack, in the order they were written."""
    return _list_decoder.decode(data) if is_pack(data) else [_decoder.decode(data)]


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and versions (crc32), unlike Python's hash()."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % partitions


def now_us() -> int:
    return time.time_ns() // 1000


class _RandomPool(threading.local):
    """Random bytes drawn from the OS 2 KiB at a time, per thread (a fork starts afresh), kept as hex."""

    hex = ""
    used = 0


_random = _RandomPool()
os.register_at_fork(after_in_child=lambda: setattr(_random, "hex", ""))


def new_id() -> str:
    """128 random bits in hex, as uuid4 gives but without a system call per id (ids are made per
    entry, and an unpredictable id is what keeps a client from claiming another write's id)."""
    pool = _random
    start = pool.used
    if start + 32 > len(pool.hex):
        pool.hex, start = os.urandom(2048).hex(), 0
    pool.used = start + 32
    return pool.hex[start:start + 32]


def subject_for(namespace: str, partition: int) -> str:
    return f"wal.{namespace}.{partition}"


def schedule_subject(namespace: str, entry_id: str) -> str:
    """One subject per delayed entry: JetStream keeps one schedule per subject."""
    token = uuid.uuid5(uuid.NAMESPACE_URL, entry_id).hex
    return f"wal.{namespace}.sched.{token}"


# An entry id is the Nats-Msg-Id header and a region name travels in every replicated entry: both are
# checked wherever they come from outside, so no client string becomes a NATS protocol token.
MAX_ID_BYTES = 256
_ID_RE = re.compile(r"[\x21-\x7e]{1," + str(MAX_ID_BYTES) + "}")  # printable ASCII, no space, CR or LF
REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def valid_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


class WriteTimeError(ValueError):
    """A client-given write time too far from the sidecar's clock."""


def resolve_write_time(client_time_us: int | None, max_drift_s: float, now: int | None = None) -> int:
    """The sidecar's clock, or the client's write time when it is within the drift bound."""
    now = now if now is not None else now_us()
    if client_time_us is None:
        return now
    drift = abs(client_time_us - now) / 1e6
    if drift > max_drift_s:
        direction = "future" if client_time_us > now else "past"
        raise WriteTimeError(
            f"write_time {client_time_us} is {drift:.0f}s in the {direction}; "
            f"the namespace allows {max_drift_s:.0f}s of drift"
        )
    return client_time_us
