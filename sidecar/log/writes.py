"""The journal writer's units of work: a write (what one PubAck answers), a pack, a group of writes
submitted together, a batch sent together; and how publish_many packs its messages ahead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from sidecar.envelope import pack_payload
from sidecar.log.acks import Message, WriteResult

T = TypeVar("T")


class Write:
    """What one PubAck answers: a single message, an atomic batch of messages, or a pack made ahead
    (publish_many) whose one message holds `entries` independent writes."""

    __slots__ = ("atomic", "done", "entries", "group", "messages", "nbytes", "result", "waiter")

    def __init__(self, messages: list[Message], atomic: bool, nbytes: int, entries: int = 0) -> None:
        self.messages = messages
        self.atomic = atomic
        self.nbytes = nbytes
        self.entries = entries or len(messages)  # what it holds of in-flight room (max_inflight_entries)
        self.result: WriteResult | None = None
        self.waiter: trio.lowlevel.Task | None = None
        self.group: Group | None = None
        self.done: Callable[[WriteResult], None] | None = None


class Pack(Generic[T]):
    """Packable writes of one subject stored as one message, at most one per key; its place is where its
    first member was (`slot`). Members are a burst's writes (`_send`) or a batch's messages (publish_many)."""

    __slots__ = ("keys", "members", "nbytes", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.members: list[T] = []
        self.keys: set[str] = set()
        self.nbytes = 0

    def takes(self, key: str, nbytes: int, max_entries: int, max_bytes: int) -> bool:
        """Whether a member of `key` joins; a key already in goes to the next pack (one message later)."""
        return key not in self.keys and len(self.members) < max_entries and self.nbytes + nbytes <= max_bytes

    def add(self, member: T, key: str, nbytes: int) -> None:
        self.members.append(member)
        self.keys.add(key)
        self.nbytes += nbytes


class Group:
    """Writes submitted together (publish_many): one waiter for all of them."""

    __slots__ = ("done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()


class Batch:
    __slots__ = ("remaining", "submitted", "writes")

    def __init__(self, writes: list[Write], submitted: float) -> None:
        self.writes = writes
        self.remaining = len(writes)
        self.submitted = submitted  # trio time: ack latency (shedding, stats) and the publish deadline


# What a write waiting for in-flight room holds per entry besides its encoded messages (its models and
# results): the waiting line counts it against max_inflight_bytes.
WAITING_ENTRY_BYTES = 1024


def pack_write(pack: Pack[Message]) -> Write:
    messages = pack.members
    if len(messages) == 1:
        return Write(messages, False, pack.nbytes)
    payload = pack_payload([m.payload for m in messages])
    return Write([Message(messages[0].subject, payload)], False, pack.nbytes, len(messages))


def waiting_cost(write: Write) -> int:
    return write.nbytes + WAITING_ENTRY_BYTES * write.entries


def packed_ahead(messages: list[Message], max_bytes: int, max_entries: int) -> tuple[list[Write], list[int]]:
    """The writes of a publish_many: packable messages packed per subject (by the rules the writer packs a
    round's single writes by), and for each message the index of the write that answers it. A pack of
    one stays its message (the writer may still pack it with other writers' writes of its round)."""
    writes: list[Write | None] = []
    places: list[int] = []
    packs: dict[str, Pack[Message]] = {}
    for message in messages:
        key = message.pack_key
        nbytes = len(message.payload)
        pack = packs.get(message.subject)
        if key:
            if pack is not None and not pack.takes(key, nbytes, max_entries, max_bytes):
                writes[pack.slot] = pack_write(pack)
                pack = None
            if pack is None:
                pack = packs[message.subject] = Pack(len(writes))
                writes.append(None)
            pack.add(message, key, nbytes)
            places.append(pack.slot)
            continue
        if pack is not None:  # a message that goes alone follows the pack of its subject, in order
            writes[pack.slot] = pack_write(packs.pop(message.subject))
        places.append(len(writes))
        writes.append(Write([message], False, nbytes))
    for pack in packs.values():
        writes[pack.slot] = pack_write(pack)
    return writes, places  # type: ignore[return-value]
