"""AppliedTracker's memory is bounded in bytes (sidecar.unapplied_budget), however long nothing drains."""

from __future__ import annotations

import tracemalloc

import trio

from sidecar.applied import SLOT_BYTES, AppliedTracker

MiB = 1024 * 1024


def test_a_key_rewritten_while_nothing_drains_costs_one_slot() -> None:
    tracker = AppliedTracker()
    for sequence in range(1, 10_001):
        tracker.journaled("ns", "hot", sequence, ["cache"])
    assert tracker.bytes == SLOT_BYTES + len("hot")
    tracker.applied("ns", "cache", [9_999])  # an earlier entry: the key still waits for its latest
    assert tracker.has_unapplied("ns", "cache", "hot")
    tracker.applied("ns", "cache", [10_000])
    assert not tracker.has_unapplied("ns", "cache", "hot") and tracker.bytes == 0


def test_past_the_budget_the_oldest_keys_are_forgotten() -> None:
    tracker = AppliedTracker(budget=1 * MiB)
    for sequence in range(1, 100_001):
        tracker.journaled("ns", f"key-{sequence:08d}", sequence, ["cache"])
    assert tracker.bytes <= 1 * MiB
    assert tracker.forgotten == 100_000 - tracker.bytes // (SLOT_BYTES + len("key-00000001"))
    assert not tracker.has_unapplied("ns", "cache", "key-00000001")
    assert tracker.has_unapplied("ns", "cache", "key-00100000")


def test_the_budget_counts_what_the_tracker_really_holds() -> None:
    """The per-key estimate (SLOT_BYTES + the key's length) against what Python allocates."""
    tracemalloc.start()
    try:
        tracker = AppliedTracker(budget=2 * MiB)
        for sequence in range(1, 200_001):
            tracker.journaled("ns", f"record-{sequence % 50_000:06d}/item", sequence, ["cache"])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tracker.forgotten > 0  # 50k keys of ~400 B are over 4 MiB
    assert held <= 1.25 * tracker.budget, f"{held / MiB:.1f} MiB traced for a {tracker.budget / MiB:.0f} MiB budget"


def test_acks_out_of_order_and_dead_letters() -> None:
    tracker = AppliedTracker()
    tracker.journaled("ns", "k", 11, ["cache"])
    tracker.journaled("ns", "k", 10, ["cache"])  # the earlier write's ack came second
    tracker.applied("ns", "cache", [10])
    assert tracker.has_unapplied("ns", "cache", "k")
    tracker.applied("ns", "cache", [-11])  # the latest was dead-lettered: settled, nothing to wait for
    assert not tracker.has_unapplied("ns", "cache", "k") and tracker.bytes == 0


async def test_a_waiter_wakes_when_the_latest_entry_is_applied() -> None:
    tracker = AppliedTracker()
    tracker.journaled("ns", "k", 1, ["cache"])
    tracker.journaled("ns", "k", 2, ["cache"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_notice_later, tracker)  # the notice comes while the waiter waits
        assert await tracker.wait_key_applied("ns", "cache", "k", timeout=10)
    assert not tracker.has_unapplied("ns", "cache", "k")


async def _notice_later(tracker: AppliedTracker) -> None:
    await trio.sleep(0.01)
    tracker.applied("ns", "cache", [1, 2])


async def test_keys_of_one_mutation_share_a_sequence() -> None:
    """Every entry of a MULTI mutation carries its marker's sequence: the notice for it clears every key,
    a later write of one of them is tracked on its own, and a waiter never spins on a cleared key."""
    tracker = AppliedTracker()
    for key in ("a", "b", "c"):
        tracker.journaled("ns", key, 5, ["cache"])
    tracker.journaled("ns", "a", 6, ["cache"])  # a later write of one key of the mutation
    tracker.applied("ns", "cache", [5])
    assert not tracker.has_unapplied("ns", "cache", "b") and not tracker.has_unapplied("ns", "cache", "c")
    assert tracker.has_unapplied("ns", "cache", "a")  # its latest, 6, is not applied yet
    with trio.fail_after(5):
        assert await tracker.wait_key_applied("ns", "cache", "b", timeout=1)
    tracker.journaled("ns", "b", 7, ["cache"])
    tracker.journaled("ns", "c", 7, ["cache"])
    tracker.applied("ns", "cache", [-7])  # dead-lettered: settled for both keys
    assert not tracker.has_unapplied("ns", "cache", "b") and not tracker.has_unapplied("ns", "cache", "c")
    tracker.applied("ns", "cache", [6])
    assert tracker.bytes == 0 and not tracker._keys_of


async def test_a_waiter_moves_on_when_its_entry_was_applied_before_it_waited() -> None:
    """A key still listed at a sequence whose notice already came (the index missed it) is cleared by the
    waiter, instead of the waiter looping on it without ever yielding."""
    tracker = AppliedTracker()
    tracker.journaled("ns", "k", 3, ["cache"])
    tracker._keys_of.clear()  # as if the notice could not find the key
    tracker.applied("ns", "cache", [3])
    assert tracker.has_unapplied("ns", "cache", "k")
    with trio.fail_after(5):
        assert await tracker.wait_key_applied("ns", "cache", "k", timeout=1)
