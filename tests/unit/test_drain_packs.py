"""The drain holds each entry of a pack on its own, within its byte budget, and settles the pack once.

The worker is driven with deliveries built here; the consumer and the drainer around it are stand-ins
(the journal and targets are exercised against real servers in tests/integration/test_journal_packs.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from sidecar.config import DrainSettings
from sidecar.drain.consumer import Delivered
from sidecar.drain.held import MIN_ENTRY_BYTES, Pack
from sidecar.drain.partition import PartitionWorker
from sidecar.drain.recent import RecentBudget
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import ChunkRef, Entry, Op, encode, pack_payload
from sidecar.memory_budget import worker_floor

MAX_PAYLOAD = 1024 * 1024


def test_a_pack_is_announced_once_after_its_last_entry() -> None:
    pack = Pack(b"reply")
    pack.remaining = 3
    assert pack.settle(7, dead=False) == 0
    assert pack.settle(7, dead=False) == 0
    assert pack.settle(7, dead=False) == 7


def test_a_pack_with_a_dead_letter_is_announced_settled_not_applied() -> None:
    """An applied notice says every key of the sequence is applied: not true when one was dead-lettered."""
    pack = Pack(b"reply")
    pack.remaining = 2
    assert pack.settle(9, dead=True) == 0
    assert pack.settle(9, dead=False) == -9


class Consumer:
    def __init__(self) -> None:
        self.acked: list[bytes] = []

    def signal(self, replies: list[bytes], body: bytes = b"+ACK") -> None:
        self.acked += replies

    def poke(self) -> None:
        pass


def worker(budget: int, ordered: bool = False) -> tuple[PartitionWorker, Consumer]:
    service = SimpleNamespace(recent_budget=RecentBudget(1 << 20))
    drainer = SimpleNamespace(settings=DrainSettings(), byte_budget=budget, service=service,
                              fetching=lambda: True, largest_message=lambda: MAX_PAYLOAD + 4096,
                              wants=lambda entry: True, namespace="n", ordered=ordered)
    consumer = Consumer()
    return PartitionWorker(drainer, 0, consumer), consumer  # type: ignore[arg-type]


def smallest_pack(seq: int, count: int = 64) -> Delivered:
    """A pack of the smallest entries there are: the most entries (and Python objects) per byte."""
    entries = [encode(Entry(id=str(i % 10), ns="n", op=Op.PUT, key=f"{seq}.{i}", partition=0, write_time=0))
               for i in range(count)]
    return Delivered(seq, b"$JS.ACK.s.c.1.%d.%d.0.0" % (seq, seq), pack_payload(entries))


def test_a_pull_of_packs_of_the_smallest_entries_stays_within_the_byte_budget() -> None:
    budget = worker_floor(MAX_PAYLOAD)  # the least a worker gets
    drain, _ = worker(budget)
    messages, max_bytes = drain._allowance()
    assert messages > 0 and max_bytes > 0
    delivered, size, seq = [], 0, 1
    while True:  # as many packs as the server may send for this request
        pack = smallest_pack(seq)
        if len(delivered) == messages or size + len(pack.data) + len(pack.reply) > max_bytes:
            break
        delivered.append(pack)
        size += len(pack.data) + len(pack.reply)
        seq += 1
    assert len(pack.data) / 64 < 2 * MIN_ENTRY_BYTES  # these are the smallest entries indeed
    assert delivered
    drain._take(delivered)
    assert len(drain.held) == 64 * len(delivered)
    assert drain.held_bytes <= budget


def test_a_message_over_max_bytes_is_asked_for_alone_when_the_largest_fits() -> None:
    drain, _ = worker(worker_floor(MAX_PAYLOAD))
    assert drain._allowance(one_large=True) == (1, MAX_PAYLOAD + 4096)
    drain._take([smallest_pack(1)])
    drain.held_bytes = drain.byte_budget // 2  # no longer room for the largest message twice
    assert drain._allowance(one_large=True) == (0, 0)


def test_a_redelivered_pack_adds_nothing_while_part_of_it_is_held() -> None:
    """Entries of it this worker applied are not applied again behind a key's later entries."""
    drain, consumer = worker(64 * 1024 * 1024)
    pack = smallest_pack(5, count=3)
    drain._take([pack])
    first = drain.lanes["5.0"].pop(0)  # as a round that applied the first entry does
    drain._release(first)
    drain.lanes.pop("5.0")
    assert drain._settled(first, dead=False) is None  # two entries still held: no ack yet
    drain._take([Delivered(5, b"$JS.ACK.s.c.2.5.9.0.0", pack.data)])  # redelivered (an ack timer ran out)
    assert "5.0" not in drain.lanes and len(drain.held) == 2
    for held in [drain.lanes["5.1"][0], drain.lanes["5.2"][0]]:
        drain._release(held)
        settled = drain._settled(held, dead=False)
    assert settled == (pack.reply, 5) and not drain.packs and consumer.acked == []



class _Pump:
    """Applies every run whole, as a target that always succeeds."""

    def __init__(self) -> None:
        self.runs: list[list[str]] = []

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        self.runs += [[entry.key for entry in run] for run in runs]
        return [RunOutcome(len(run)) for run in runs]


def ordered_worker() -> tuple[PartitionWorker, Consumer, _Pump]:
    drain, consumer = worker(64 * 1024 * 1024, ordered=True)
    pump = _Pump()
    drain.drainer.pump = pump  # type: ignore[attr-defined]
    drain.drainer.stats = SimpleNamespace(observe_latency=lambda _: None, applied=0, last_error="")  # type: ignore[attr-defined]
    drain.drainer.breaker = SimpleNamespace(record=lambda **_: None)  # type: ignore[attr-defined]
    drain.drainer.applied = lambda _: None  # type: ignore[attr-defined]
    return drain, consumer, pump


async def test_an_ordered_target_is_handed_its_partition_as_one_lane_in_stream_order() -> None:
    """A target that keeps order across keys (kafka, ordering = "partition") gets one run of every key, in
    journal order. A delivery lost on its way comes back after later entries of other keys landed: it is
    held and applied then (only a key's own later entry makes an older one of it skipped)."""
    drain, consumer, pump = ordered_worker()
    lost, later = smallest_pack(1, count=3), smallest_pack(2, count=2)
    drain._take([later])  # the delivery of 1 was lost (a link moved to another server)
    assert list(drain.lanes) == ["partition-0"] and drain.ready == {"partition-0"}
    keys, runs = drain._runs_for(list(drain.ready))
    assert keys == ["partition-0"] and [held.pos for held in runs[0]] == [(2, 0), (2, 1)]
    drain.ready.clear()
    await drain._round(keys, runs)
    assert consumer.acked == [later.reply] and not drain.lanes and not drain.held
    drain._take([lost])  # redelivered after AckWait
    drain._take([Delivered(2, b"$JS.ACK.s.c.2.2.9.0.0", later.data)])  # applied already: acked again, not held
    assert consumer.acked == [later.reply, b"$JS.ACK.s.c.2.2.9.0.0"]
    keys, runs = drain._runs_for(list(drain.ready))
    await drain._round(keys, runs)
    assert pump.runs == [["2.0", "2.1"], ["1.0", "1.1", "1.2"]] and consumer.acked[-1] == lost.reply


async def test_an_ordered_run_stops_at_a_payload_it_cannot_read() -> None:
    """A chunked payload that cannot be read stops the run there: the entries of other keys before it
    are applied, and the failure is its own, not charged to the run's head."""
    drain, _, pump = ordered_worker()

    def message(seq: int, key: str, chunked: bool = False) -> Delivered:
        chunk = ChunkRef(object=f"o{seq}", size=10, chunks=1, digest="sha256=0") if chunked else None
        entry = Entry(id=f"i{seq}", ns="n", op=Op.PUT, key=key, partition=0, write_time=0, chunk=chunk)
        return Delivered(seq, b"$JS.ACK.s.c.1.%d.%d.0.0" % (seq, seq), encode(entry))

    async def unreadable(entry: Entry) -> Entry:
        raise ApplyError(ErrorClass.PERMANENT, "chunk not found")

    drain._with_payload = unreadable  # type: ignore[method-assign]
    drain._take([message(1, "a"), message(2, "b"), message(3, "c", chunked=True), message(4, "d")])
    _, runs = drain._runs_for(list(drain.ready))
    outcomes = await drain._apply_runs(runs)
    assert pump.runs == [["a", "b"]]
    assert outcomes[0].applied == 2 and outcomes[0].error is not None
    assert outcomes[0].error.message == "chunk not found"
