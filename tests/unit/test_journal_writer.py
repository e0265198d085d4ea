"""The journal writer's bookkeeping, against a stand-in for its NATS connection.

What an app relies on: every write gets exactly one answer, never a hang — also when the
connection drops between a write being admitted and being sent. The real connection and
server are exercised in tests/integration (test_journal_faults, test_nats_link).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from sidecar.config import JournalSettings
from sidecar.envelope import Entry, Op, decode_message, encode, is_pack
from sidecar.log import writer as writer_module
from sidecar.log.writer import Durable, JournalWriter, Message, WriteResult
from sidecar.log.writes import WAITING_ENTRY_BYTES, packed_ahead
from sidecar.units import ByteSize


class StandInLink:
    """Records what the writer sends; the test says when it is connected and answers for NATS."""

    def __init__(self) -> None:
        self.connected = True
        self.congested = False  # the real link: its outgoing buffer is full
        self.last_error = ""
        self.max_payload = 1024 * 1024
        self.on_lost: list[Any] = []
        self.sent: list[bytes] = []

    def subscribe(self, subject: str, handler: Any) -> int:
        return 1

    def send(self, data: bytes) -> bool:
        self.sent.append(data)
        return True

    def reply_subjects(self) -> list[bytes]:
        """The reply subject of every PUB sent so far, in order."""
        subjects = []
        for chunk in self.sent:
            for line in chunk.split(b"\r\n"):
                if line.startswith((b"PUB ", b"HPUB ")):
                    subjects.append(line.split(b" ")[2])
        return subjects


class StandInConnection:
    def __init__(self) -> None:
        self.link = StandInLink()
        self.connected = True


def puback(sequence: int) -> bytes:
    return b'{"stream":"WAL_T","seq":%d}' % sequence


async def test_a_write_whose_send_finds_the_link_gone_is_answered_not_left_hanging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "EAGER_SEND_ENTRIES", 1)  # every write is sent as it is queued
    conn = StandInConnection()
    writer = JournalWriter(conn, JournalSettings(max_inflight_entries=1))  # type: ignore[arg-type]
    answers: dict[str, WriteResult] = {}

    async def write(name: str) -> None:
        answers[name] = await writer.publish("wal.t.0", name.encode())

    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        nursery.start_soon(write, "first")
        await wait_all_tasks_blocked()
        nursery.start_soon(write, "second")  # admitted by the connection check, then waits for room
        await wait_all_tasks_blocked()
        assert "second" not in answers
        conn.link.connected = False  # the link drops while "second" waits ...
        (first_reply,) = conn.link.reply_subjects()
        writer._on_reply(first_reply, b"", puback(1), None)  # ... and the PubAck of "first" frees its room
        with trio.fail_after(2):
            while len(answers) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert answers["first"].durable is Durable.TRUE and answers["first"].sequence == 1
    assert answers["second"].durable is Durable.FALSE
    assert "not connected" in answers["second"].message


async def test_a_write_answered_by_callback_is_refused_at_once_when_disconnected_and_deferred_when_full() -> None:
    conn = StandInConnection()
    writer = JournalWriter(conn, JournalSettings(max_inflight_entries=2))  # type: ignore[arg-type]
    answers: list[WriteResult] = []
    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        assert writer.publish_then("wal.t.0", b"a", None, answers.append)
        assert writer.publish_then("wal.t.0", b"b", None, answers.append)
        assert not writer.publish_then("wal.t.0", b"c", None, answers.append)  # full: the caller awaits instead
        await wait_all_tasks_blocked()
        for sequence, reply in enumerate(conn.link.reply_subjects(), start=1):
            writer._on_reply(reply, b"", puback(sequence), None)
        assert [(a.durable, a.sequence) for a in answers] == [(Durable.TRUE, 1), (Durable.TRUE, 2)]
        conn.link.connected = False
        assert writer.publish_then("wal.t.0", b"d", None, answers.append)
        assert answers[-1].durable is Durable.FALSE  # answered before publish_then returned
        assert writer.stats.inflight_entries == 0
        nursery.cancel_scope.cancel()


async def test_a_message_over_the_servers_max_payload_is_refused_and_never_sent() -> None:
    """nats-server closes the connection on a PUB over max_payload, and every write in flight with it."""
    conn = StandInConnection()
    conn.link.max_payload = 64 * 1024
    writer = JournalWriter(conn, JournalSettings())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        big = Message("wal.t.0", b"x" * (64 * 1024), {"Nats-Msg-Id": "big"})
        answers: list[WriteResult] = []
        assert writer.publish_then(big.subject, big.payload, big.headers, answers.append)
        assert answers[0].durable is Durable.FALSE and "max_payload" in answers[0].message
        atomic = await writer.publish_atomic([Message("wal.t.0", b"small"), big])
        assert atomic.durable is Durable.FALSE and "max_payload" in atomic.message
        many = writer.publish_many([Message("wal.t.0", b"small"), big])
        with trio.fail_after(2):
            async with trio.open_nursery() as inner:
                async def answer() -> None:
                    await wait_all_tasks_blocked()
                    (reply,) = conn.link.reply_subjects()
                    writer._on_reply(reply, b"", puback(1), None)
                inner.start_soon(answer)
                small, over = await many
        assert small.durable is Durable.TRUE and over.durable is Durable.FALSE
        assert all(b"xxxx" not in chunk for chunk in conn.link.sent)  # the big payload never went out
        nursery.cancel_scope.cancel()


async def test_a_write_is_refused_while_the_links_buffer_is_full() -> None:
    """A server that stops reading fills the link's bounded buffer: writes are answered false, not queued."""
    conn = StandInConnection()
    writer = JournalWriter(conn, JournalSettings())  # type: ignore[arg-type]
    answers: list[WriteResult] = []
    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        conn.link.congested = True
        assert writer.publish_then("wal.t.0", b"a", None, answers.append)
        assert answers[-1].durable is Durable.FALSE and "link full" in answers[-1].message
        assert conn.link.sent == [] and writer.stats.inflight_entries == 0
        nursery.cancel_scope.cancel()


async def test_writers_waiting_for_in_flight_room_are_bounded_and_the_excess_refused_at_once() -> None:
    """As many bytes may wait for room as may be in flight (a waiter's messages and 1 KiB an entry of
    objects); one more is answered "overloaded" at once instead of joining an unbounded line."""
    conn = StandInConnection()
    settings = JournalSettings(max_inflight_entries=2, max_inflight_bytes=ByteSize(2 * WAITING_ENTRY_BYTES + 40))
    writer = JournalWriter(conn, settings)  # type: ignore[arg-type]
    answers: dict[str, WriteResult] = {}

    async def write(name: str) -> None:
        answers[name] = await writer.publish("wal.t.0", name.encode())

    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        for name in ("in-flight 1", "in-flight 2", "waiting 1", "waiting 2", "one too many"):
            nursery.start_soon(write, name)
            await wait_all_tasks_blocked()
        assert list(answers) == ["one too many"]
        assert answers["one too many"].durable is Durable.FALSE
        assert "overloaded" in answers["one too many"].message and "retry" in answers["one too many"].message
        for sequence, reply in enumerate(conn.link.reply_subjects(), start=1):
            writer._on_reply(reply, b"", puback(sequence), None)
        await wait_all_tasks_blocked()
        for sequence, reply in enumerate(conn.link.reply_subjects()[2:], start=3):  # the waiters got room
            writer._on_reply(reply, b"", puback(sequence), None)
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert {name: a.durable for name, a in answers.items()} == {
        "in-flight 1": Durable.TRUE, "in-flight 2": Durable.TRUE, "waiting 1": Durable.TRUE,
        "waiting 2": Durable.TRUE, "one too many": Durable.FALSE}


def test_a_batch_is_packed_ahead_per_subject_one_key_a_pack_and_a_go_alone_message_after_its_subjects_pack() -> None:
    """publish_many's packs: what the drain relies on for per-key order (a key's later write in a later
    message of its subject) and what each message's answer is (the write holding it)."""
    def message(subject: str, key: str, value: str, packable: bool = True) -> Message:
        payload = encode(Entry(id=value, ns="n", op=Op.PUT, key=key, partition=0, value=value.encode(), write_time=1))
        return Message(subject, payload, {"Nats-Msg-Id": value}, key if packable else "")

    messages = [message("s0", "a", "a1"), message("s1", "x", "x1"), message("s0", "b", "b1"),
                message("s0", "a", "a2"),  # `a` again: its subject's next pack
                message("s1", "y", "y1", packable=False),  # alone: after s1's pack, before anything later
                message("s0", "c", "c1"), message("s0", "d", "d1"), message("s0", "e", "e1")]
    writes, places = packed_ahead(messages, max_bytes=1 << 20, max_entries=3)

    def contents(write: Any) -> list[str]:
        payload = write.messages[0].payload
        return [e.id for e in decode_message(payload)]

    assert [contents(w) for w in writes] == [["a1", "b1"], ["x1"], ["a2", "c1", "d1"], ["y1"], ["e1"]]
    assert [contents(writes[p])[0] for p in places] == ["a1", "x1", "a1", "a2", "y1", "a2", "a2", "e1"]
    # A pack is one message without the members' ids; a pack of one keeps its message as it was.
    assert is_pack(writes[0].messages[0].payload) and writes[0].messages[0].headers is None
    assert writes[0].entries == 2 and writes[2].entries == 3
    assert writes[1].messages[0] is messages[1] and writes[1].entries == 1
    # The byte bound closes a pack as the entry bound does.
    by_bytes, _ = packed_ahead(messages[:3], max_bytes=len(messages[0].payload) + 1, max_entries=64)
    assert [contents(w) for w in by_bytes] == [["a1"], ["x1"], ["b1"]]


async def test_a_burst_holds_at_most_max_batch_entries_entries_also_when_packed_ahead() -> None:
    """max_batch_entries bounds what one write to NATS carries in entries, as documented, not in writes:
    a pack made ahead counts as the entries it holds."""
    conn = StandInConnection()
    writer = JournalWriter(conn, JournalSettings(max_batch_entries=8, pack_entries=4))  # type: ignore[arg-type]
    messages = [Message(f"wal.t.{n % 2}", b"x", {"Nats-Msg-Id": f"id{n}"}, f"k{n}") for n in range(24)]
    async with trio.open_nursery() as nursery:
        await writer.start(nursery)
        nursery.start_soon(writer.publish_many, messages)  # 6 packs of 4
        await wait_all_tasks_blocked()
        assert [chunk.count(b"PUB ") for chunk in conn.link.sent] == [2, 2, 2]
        for sequence, reply in enumerate(conn.link.reply_subjects(), start=1):
            writer._on_reply(reply, b"", puback(sequence), None)
        await wait_all_tasks_blocked()
        assert writer.stats.acked == 24 and writer.stats.inflight_entries == 0
        nursery.cancel_scope.cancel()
