"""The read-your-writes overlay's bookkeeping (sidecar/overlay.py), without services."""

from __future__ import annotations

import time

from sidecar.applied import AppliedTracker
from sidecar.config import validate
from sidecar.envelope import Op
from sidecar.ingress import Ingress
from sidecar.log.writer import Durable, WriteResult
from sidecar.overlay import SLOT_OVERHEAD, NamespaceOverlay, Overlays

BIG = 1 << 30


def test_newest_value_wins_and_an_older_ack_never_replaces_it() -> None:
    overlay = NamespaceOverlay("cache")
    overlay.put("k", "", 5, b"five", 1, 0, BIG)
    overlay.put("k", "", 3, b"three", 0, 0, BIG)  # acked later, journaled earlier
    entry = overlay.get("k")
    assert entry is not None and entry.value == b"five" and entry.flags == 1 and entry.live()
    overlay.put("k", "", 7, None, 0, 0, BIG)  # a delete: a tombstone
    entry = overlay.get("k")
    assert entry is not None and entry.value is None and not entry.live()


def test_an_applied_notice_removes_a_slot_at_or_after_its_sequence_only() -> None:
    overlay = NamespaceOverlay("cache")
    overlay.put("k", "", 5, b"a", 0, 0, BIG)
    overlay.put("k", "", 9, b"b", 0, 0, BIG)
    overlay.applied([5])  # the older write landed: the newer one is still only here
    assert overlay.get("k").value == b"b"  # type: ignore[union-attr]
    overlay.applied([9])
    assert overlay.get("k") is None and overlay.bytes == 0 and len(overlay) == 0


def test_touch_moves_an_overlaid_value_to_the_touchs_sequence_and_ignores_others() -> None:
    overlay = NamespaceOverlay("cache")
    overlay.touch("absent", "", 4, 123)
    assert overlay.get("absent") is None
    overlay.put("k", "", 5, b"v", 0, 0, BIG)
    overlay.touch("k", "", 6, int(time.time()) + 100)
    entry = overlay.get("k")
    assert entry is not None and 98 <= entry.ttl() <= 100
    overlay.applied([5])
    assert overlay.get("k") is not None  # the touch is not applied yet
    overlay.applied([6])
    assert overlay.get("k") is None


def test_expired_values_read_as_misses_and_ttl_is_minus_one_without_expiry() -> None:
    overlay = NamespaceOverlay("cache")
    overlay.put("old", "", 1, b"v", 0, int(time.time()) - 1, BIG)
    overlay.put("forever", "", 2, b"v", 0, 0, BIG)
    assert not overlay.get("old").live()  # type: ignore[union-attr]
    assert overlay.get("forever").ttl() == -1  # type: ignore[union-attr]


def test_the_byte_budget_evicts_the_oldest_slots_and_counts_them() -> None:
    overlay = NamespaceOverlay("cache")
    one = len("k00") + 100 + SLOT_OVERHEAD
    for index in range(10):
        overlay.put(f"k{index:02d}", "", index + 1, b"x" * 100, 0, 0, 3 * one)
    assert len(overlay) == 3 and overlay.bytes == 3 * one and overlay.evictions == 7
    assert overlay.get("k00") is None and overlay.get("k09") is not None
    overlay.applied(list(range(1, 11)))
    assert len(overlay) == 0 and overlay.bytes == 0


def test_items_of_a_record_and_one_sequence_for_a_whole_mutation() -> None:
    overlay = NamespaceOverlay("store")
    overlay.put("rec", "a", 10, b"1", 0, 0, BIG)
    overlay.put("rec", "b", 10, b"2", 0, 0, BIG)  # a MULTI marker: one sequence for both
    overlay.put("rec", "", 11, None, 0, 0, BIG)
    assert set(overlay.items_of("rec")) == {"", "a", "b"}
    overlay.applied([10])
    assert set(overlay.items_of("rec")) == {""}
    overlay.applied([11])
    assert overlay.items_of("rec") == {} and overlay.bytes == 0


def test_overlays_follow_the_primary_and_ignore_other_targets_notices() -> None:
    overlays = Overlays()
    overlay = overlays.of("ns", "cache")
    overlay.put("k", "", 1, b"v", 0, 0, BIG)
    overlays.applied("ns", "replica", [1])
    assert overlay.get("k") is not None
    overlays.applied("ns", "cache", [1])
    assert overlay.get("k") is None
    overlay.put("k", "", 2, b"v", 0, 0, BIG)
    assert overlays.of("ns", "other").get("k") is None  # the primary changed: start empty
    overlays.drop("ns")
    assert "ns" not in overlays.namespaces


def test_a_dead_lettered_entry_leaves_the_overlay_and_stops_the_waits() -> None:
    tracker = AppliedTracker()
    overlays = Overlays()
    tracker.on_applied = overlays.applied
    overlay = overlays.of("ns", "cache")
    tracker.journaled("ns", "k", 4, ["cache"])
    overlay.put("k", "", 4, b"poison", 0, 0, BIG)
    tracker.applied("ns", "cache", [-4])
    assert overlay.get("k") is None
    assert not tracker.has_unapplied("ns", "cache", "k")
    assert not tracker.is_applied("ns", "cache", 4)  # settled, never visible


def _ingress(**namespace: object) -> Ingress:
    targets = [{"name": "cache", "type": "memcached", "servers": ["127.0.0.1:1"]},
               {"name": "remote", "type": "wal", "url": "http://127.0.0.1:2"}]
    config = validate({"sidecar": {"nats_url": "nats://127.0.0.1:4222"}, "listeners": [],
                       "namespaces": {"ns": {"targets": targets, **namespace}}})
    return Ingress(config, journal=None)  # type: ignore[arg-type]  # _ack never touches the journal


def test_the_ingress_overlays_acked_writes_for_the_primary_only() -> None:
    ingress = _ingress()
    ok = WriteResult(durable=Durable.TRUE, sequence=10)
    put = ingress.entry("ns", Op.PUT, "k", value=b"v", flags=3)
    ingress._ack([put], ok)
    overlay = ingress.overlay("ns")
    assert overlay is not None
    entry = overlay.get("k")
    assert entry is not None and entry.value == b"v" and entry.flags == 3
    # Only for the remote region: memcached never gets it, so reads must not show it.
    remote = ingress.entry("ns", Op.PUT, "r", value=b"v", targets=["remote"])
    ingress._ack([remote], WriteResult(durable=Durable.TRUE, sequence=11))
    delayed = ingress.entry("ns", Op.PUT, "d", value=b"v", delay_ms=60_000)
    ingress._ack([delayed], WriteResult(durable=Durable.TRUE, sequence=12))
    # The drain's notice beat the ack: nothing to overlay.
    ingress.applied.applied("ns", "cache", [13])
    fast = ingress.entry("ns", Op.PUT, "f", value=b"v")
    ingress._ack([fast], WriteResult(durable=Durable.TRUE, sequence=13))
    failed = ingress.entry("ns", Op.PUT, "x", value=b"v")
    ingress._ack([failed], WriteResult(durable=Durable.FALSE))
    assert set(overlay.entries) == {("k", "")}
    ingress.applied.applied("ns", "cache", [10])
    assert len(overlay) == 0


def test_read_your_writes_off_keeps_no_overlay() -> None:
    ingress = _ingress(read_your_writes=False)
    put = ingress.entry("ns", Op.PUT, "k", value=b"v")
    ingress._ack([put], WriteResult(durable=Durable.TRUE, sequence=1))
    assert ingress.overlay("ns") is None and not ingress.overlays.namespaces
