"""What a journal write answers: its result, the PubAck it is read from, and the writer's counters.

The writer (writer.py) matches replies to writes; this module only says what a reply means.
A result is `durable: true` only when built from a PubAck without an error.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class Durable(StrEnum):
    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"


# WriteResult and Message are `gc=False` (no cycle through them: strings, bytes, numbers, a dict of strings):
# a batch makes one of each per entry, and the cyclic GC would walk every one still held.
class WriteResult(msgspec.Struct, omit_defaults=True, gc=False):
    durable: Durable
    sequence: int = 0  # stream sequence of the (last) message
    count: int = 1  # messages stored: an atomic batch stores all of them, sequences count..sequence
    duplicate: bool = False
    message: str = ""
    stream: str = ""
    code: int = 0  # JetStream's err_code when the server refused the write
    conflict: bool = False  # the write's ids were used before by a different write (HTTP 409)
    # An atomic batch found stored already: where each of its entries is, to compare with the retry.
    stored_at: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.durable is Durable.TRUE

    @property
    def first_sequence(self) -> int:
        return self.sequence - self.count + 1 if self.sequence else 0


class Message(msgspec.Struct, frozen=True, array_like=True, gc=False):
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None
    # The entry's key when the writer may store it in a pack with other entries of its subject queued in
    # the same group commit (sidecar/envelope.py); "" when it goes alone: an id that must stay its message's
    # Nats-Msg-Id (a client's idempotency token, a replicated entry), a scheduled or chunked entry.
    pack_key: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str = ""
    count: int = 0
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(PubAck)


class JournalStats:
    """Counters the memcached `stats` command, the admin endpoint and metrics read."""

    __slots__ = ("acked", "duplicates", "failed", "inflight_bytes", "inflight_entries", "last_ack_latency", "shed",
                 "unknown")

    def __init__(self) -> None:
        self.acked = 0
        self.duplicates = 0
        self.failed = 0
        self.unknown = 0
        self.shed = 0
        self.inflight_entries = 0
        self.inflight_bytes = 0
        self.last_ack_latency = 0.0


def refused(message: str) -> WriteResult:
    return WriteResult(Durable.FALSE, message=message)


def result_from_ack(data: bytes, status: bytes) -> WriteResult:
    if status == b"503":
        return refused("journal stream unavailable: no responders (is the stream provisioned?)")
    try:
        ack = _ack_decoder.decode(data)
    except msgspec.DecodeError:
        return WriteResult(Durable.UNKNOWN, message=f"unreadable PubAck: {data[:80]!r}")
    if ack.error is not None:
        description = str(ack.error.get("description", "error"))
        # 10201 (an atomic batch with an id already stored) says *some* id is: the journal asks
        # which (Journal.append_atomic), as a batch with one new entry is no retry of a stored one.
        return WriteResult(Durable.FALSE, message=f"journal rejected the write: {description}",
                           code=int(ack.error.get("err_code") or 0))
    return WriteResult(
        Durable.TRUE, sequence=ack.seq, count=max(ack.count, 1), duplicate=ack.duplicate, stream=ack.stream
    )
