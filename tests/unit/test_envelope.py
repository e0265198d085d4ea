"""The journal envelope: stable partitions, readable across versions, honest write times."""

from __future__ import annotations

import os
import threading

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import envelope
from sidecar.envelope import ChunkRef, CqlMutation, CqlStatement, Entry, Op, WriteTimeError


def test_round_trip_every_field() -> None:
    entry = Entry(
        id="tok", ns="sessions", op=Op.CQL, key="user:1", partition=3, item="name", value=b"\x00v",
        chunk=ChunkRef(object="o", size=10, chunks=1, digest="sha256=ab"), content_type="text/plain", flags=7,
        expires_at=1_900_000_000, write_time=1_700_000_000_000_000, deliver_at=1_700_000_001_000_000,
        origin="us-east-1", targets=["cache"],
        cql=CqlMutation(statements=[CqlStatement(query="INSERT ...", values=[b"\x01", None], types=["int", "text"])],
                        batch_type=0),
        batch=envelope.BatchRef(id="b", index=1, count=2),
    )
    assert envelope.decode(envelope.encode(entry)) == entry


def test_entries_from_a_newer_walcar_stay_readable() -> None:
    """A later version may add fields; this one ignores what it does not know."""
    newer = {"v": 2, "id": "x", "ns": "n", "op": "put", "key": "k", "partition": 0, "write_time": 1,
             "value": b"v", "shiny_new_field": {"anything": [1, 2]}}
    entry = envelope.decode(msgspec.msgpack.encode(newer))
    assert (entry.v, entry.id, entry.value) == (2, "x", b"v")


def test_entries_from_an_older_walcar_get_defaults() -> None:
    older = {"id": "x", "ns": "n", "op": "delete", "key": "k", "partition": 1, "write_time": 5}
    entry = envelope.decode(msgspec.msgpack.encode(older))
    assert entry.v == 1 and entry.item == "" and entry.targets == [] and entry.origin == ""


def test_partition_is_stable_across_processes() -> None:
    # Pinned values: a change here would move every key to another partition.
    assert [envelope.partition_of(k, 16) for k in ("a", "user:1", "é", "")] == [3, 2, 14, 0]


@given(st.text(), st.integers(1, 1024))
def test_partition_in_range(key: str, partitions: int) -> None:
    assert 0 <= envelope.partition_of(key, partitions) < partitions


def test_write_time_drift() -> None:
    now = 1_700_000_000_000_000
    assert envelope.resolve_write_time(None, 60, now) == now
    assert envelope.resolve_write_time(now - 59_000_000, 60, now) == now - 59_000_000
    with pytest.raises(WriteTimeError, match="61s in the past"):
        envelope.resolve_write_time(now - 61_000_000, 60, now)
    with pytest.raises(WriteTimeError, match="in the future"):
        envelope.resolve_write_time(now + 3_600_000_000, 60, now)


def test_schedule_subject_is_one_token_per_entry() -> None:
    first = envelope.schedule_subject("ns", "id-1")
    assert first == envelope.schedule_subject("ns", "id-1") != envelope.schedule_subject("ns", "id-2")
    assert first.startswith("wal.ns.sched.") and first.count(".") == 3


def test_new_ids_are_128_random_bits_unique_across_threads_and_a_fork() -> None:
    new_id = envelope.new_id
    ids = [new_id() for _ in range(2000)]  # several refills of the pool
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids)
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.extend(new_id() for _ in range(300))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen + ids)) == len(seen) + len(ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's next id must not be the parent's next one (a pool copied by fork)
        os.write(write, new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64).decode() != new_id()


@pytest.mark.parametrize("count", [2, 15, 16, 64])
def test_a_pack_is_its_entries_encoded_once_behind_an_array_header(count: int) -> None:
    entries = [Entry(id=f"id{i}", ns="n", op=Op.PUT, key=f"k{i}", partition=0, value=b"v" * i, write_time=i)
               for i in range(count)]
    data = envelope.pack_payload([envelope.encode(e) for e in entries])
    assert envelope.is_pack(data)
    assert envelope.decode_message(data) == entries


def test_a_single_entry_is_not_a_pack() -> None:
    entry = Entry(id="x", ns="n", op=Op.DELETE, key="k", partition=0, write_time=1)
    assert not envelope.is_pack(envelope.encode(entry)) and not envelope.is_pack(b"")
    assert envelope.decode_message(envelope.encode(entry)) == [entry]
