"""Pure pieces of the drain: run collapsing, backoff, the adaptive limit, the breaker, ack subjects, notices,
the lease view, the memory of recently applied keys."""

from __future__ import annotations

import time
from typing import NamedTuple

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from sidecar.applied import AppliedTracker
from sidecar.drain.backpressure import AdaptiveLimit, BreakerState, CircuitBreaker
from sidecar.drain.consumer import parse_reply
from sidecar.drain.lease import LeaseView
from sidecar.drain.recent import RecentBudget, RecentlyApplied
from sidecar.drain.settling import backoff
from sidecar.drain.targets.memcached import cache_key, collapse, effects
from sidecar.envelope import Entry, Op

NOW = 1_800_000_000.0


def entry(op: Op, value: bytes = b"", expires_at: int = 0, flags: int = 0, key: str = "k", item: str = "") -> Entry:
    return Entry(id="i", ns="n", op=op, key=key, partition=0, item=item, value=value, flags=flags,
                 expires_at=expires_at, write_time=1)


def test_collapse_keeps_the_last_effect() -> None:
    assert collapse([entry(Op.PUT, b"a"), entry(Op.PUT, b"b", flags=3)], NOW).kind == "set"
    assert collapse([entry(Op.PUT, b"a"), entry(Op.PUT, b"b", flags=3)], NOW).value == b"b"
    assert collapse([entry(Op.PUT, b"a"), entry(Op.DELETE)], NOW).kind == "delete"
    last = collapse([entry(Op.DELETE), entry(Op.PUT, b"c")], NOW)
    assert (last.kind, last.value) == ("set", b"c")


def test_a_records_run_collapses_per_item() -> None:
    """Lanes are per record; each KV item is a memcached key of its own: a put of item a then a delete
    of item b in one run is both (collapsing the run as one key lost the put)."""
    run = [entry(Op.PUT, b"1", key="r", item="a"), entry(Op.DELETE, key="r", item="b"),
           entry(Op.PUT, b"2", key="r", item="a")]
    found = {key: (effect.kind, effect.value) for key, effect in effects(run, NOW)}
    assert found == {cache_key(run[0]): ("set", b"2"), cache_key(run[1]): ("delete", b"")}
    assert [key for key, _ in effects([entry(Op.PUT, b"x")], NOW)] == [b"k"]


def test_collapse_touch_after_set_moves_the_expiry() -> None:
    effect = collapse([entry(Op.PUT, b"a", expires_at=int(NOW) + 10), entry(Op.TOUCH, expires_at=int(NOW) + 99)], NOW)
    assert (effect.kind, effect.value, effect.exptime) == ("set", b"a", int(NOW) + 99)
    assert collapse([entry(Op.DELETE), entry(Op.TOUCH, expires_at=int(NOW) + 5)], NOW).kind == "delete"
    assert collapse([entry(Op.TOUCH, expires_at=int(NOW) + 5)], NOW).kind == "touch"


def test_an_already_expired_set_removes_the_key() -> None:
    """Applied late, a set that has expired by now must leave what it would have left: nothing."""
    assert collapse([entry(Op.PUT, b"a", expires_at=int(NOW) - 1)], NOW).kind == "delete"
    assert collapse([entry(Op.PUT, b"a", expires_at=0)], NOW).kind == "set"


def test_cache_keys() -> None:
    assert cache_key(entry(Op.PUT, key="user:1")) == b"user:1"
    assert cache_key(entry(Op.PUT, key="user:1", item="name")) == b"user:1/name"
    assert cache_key(entry(Op.PUT, key="b64:AP8=")) == b"\x00\xff"


@given(st.integers(1, 60), st.floats(0.001, 1), st.floats(1, 60), st.floats(1, 4))
def test_backoff_is_bounded_and_jittered(attempts: int, initial: float, maximum: float, multiplier: float) -> None:
    delay = backoff(attempts, initial, maximum, multiplier)
    cap = min(maximum, initial * multiplier ** (attempts - 1))
    assert cap / 2 <= delay <= cap


async def test_adaptive_limit_grows_when_fast_and_shrinks_on_errors() -> None:
    limit = AdaptiveLimit(initial=10, minimum=2, maximum=100)
    for _ in range(5):
        granted = await limit.acquire(50)
        limit.release(granted, 0.001, failed=False)
    assert limit.limit == 15
    granted = await limit.acquire(50)
    limit.release(granted, 0.001, failed=True)
    assert limit.limit == 11
    granted = await limit.acquire(50)
    limit.release(granted, 0.5, failed=False)  # far slower than the best seen: back off
    assert limit.limit == 8


async def test_adaptive_limit_blocks_when_used_up() -> None:
    limit = AdaptiveLimit(initial=4, minimum=1)
    assert await limit.acquire(10) == 4
    got = []

    async def second() -> None:
        got.append(await limit.acquire(2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        limit.release(4, 0.001, failed=False)
    assert got == [2]


async def test_breaker_opens_probes_and_closes() -> None:
    breaker = CircuitBreaker(failure_rounds=3)
    for _ in range(2):
        breaker.record(succeeded=False, unavailable=False, error="timeout")
    assert breaker.state is BreakerState.CLOSED
    breaker.record(succeeded=False, unavailable=False, error="timeout")
    assert breaker.state is BreakerState.OPEN and breaker.last_error == "timeout"
    with trio.move_on_after(0.05) as scope:
        await breaker.wait_until_usable()
    assert scope.cancelled_caught  # open: nothing goes through
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.HALF_OPEN
    await breaker.wait_until_usable()  # the one trial round
    with trio.move_on_after(0.05) as scope:
        await breaker.wait_until_usable()
    assert scope.cancelled_caught  # a second round waits for the trial's verdict
    breaker.record(succeeded=True, unavailable=False)
    assert breaker.state is BreakerState.CLOSED


async def test_breaker_opens_at_once_when_the_target_is_unreachable() -> None:
    breaker = CircuitBreaker(failure_rounds=5)
    breaker.record(succeeded=False, unavailable=True, error="connection refused")
    assert breaker.state is BreakerState.OPEN
    assert breaker.next_probe_delay(0) < breaker.next_probe_delay(3) <= breaker.probe_max


def test_parse_ack_reply_subjects() -> None:
    assert parse_reply("$JS.ACK.WAL_X.drain-c-0.1.42.7.1700000000000000000.3") == (42, 1, 1700000000000000000)
    assert parse_reply("$JS.ACK.hub.ACC.WAL_X.drain-c-0.2.43.8.1700000000000000001.0.abc") == \
        (43, 2, 1700000000000000001)


async def test_applied_tracker_waits_and_remembers_early_notices() -> None:
    tracker = AppliedTracker()
    tracker.applied("n", "cache", [5])
    assert await tracker.wait_applied("n", "cache", 5, 0.01)  # the notice beat the waiter
    assert not await tracker.wait_applied("n", "cache", 6, 0.01)
    tracker.journaled("n", "k", 7, ["cache", "db"])
    tracker.journaled("n", "k", 9, ["cache", "db"])
    assert tracker.has_unapplied("n", "cache", "k")
    tracker.applied("n", "cache", [9])  # per key, applying 9 means 7 was applied before it
    assert not tracker.has_unapplied("n", "cache", "k")
    assert tracker.has_unapplied("n", "db", "k")

    async def later() -> None:
        await trio.sleep(0.02)
        tracker.applied("n", "db", [7, 9])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await tracker.wait_key_applied("n", "db", "k", 1.0)


class _Entry(NamedTuple):
    key: str
    operation: str = "PUT"


def test_lease_view_counts_live_drainers_and_forgets_the_silent_ones() -> None:
    view = LeaseView(ttl=0.2)
    for key in ["members.ns.cache.a", "members.ns.cache.b", "members.ns.db.a", "members.ns.cache.x.c",
                "lease.ns.cache.0", "lease.ns.db.3"]:
        view.seen(_Entry(key))
    assert view.drainers("ns.cache", "a") == 2  # ns.cache.x is a target of its own, not this one
    assert view.drainers("ns.cache", "new") == 3  # itself, before its first heartbeat comes back
    assert view.drainers("ns.db", "a") == 1
    assert view.taken() == {"lease.ns.cache.0", "lease.ns.db.3"}
    view.seen(_Entry("members.ns.cache.b", "PURGE"))  # a clean leave counts at once
    view.seen(_Entry("lease.ns.db.3", "DEL"))  # so does a released lease
    assert view.drainers("ns.cache", "a") == 1
    assert view.taken() == {"lease.ns.cache.0"}
    time.sleep(0.12)
    view.seen(_Entry("members.ns.cache.a"))  # heartbeats and renewals keep keys alive
    view.seen(_Entry("lease.ns.cache.0"))
    time.sleep(0.12)  # the others went a whole TTL without a put: their drainers died
    assert view.drainers("ns.cache", "a") == 1
    assert view.drainers("ns.db", "b") == 1
    assert view.taken() == {"lease.ns.cache.0"}


def test_recently_applied_keys_are_remembered_for_a_window_then_forgotten() -> None:
    budget = RecentBudget(1 << 20)
    recent = RecentlyApplied(window=10.0, budget=budget)
    recent.remember("a", 5, now=0.0)
    recent.remember("b", 7, now=1.0)
    assert (recent.last("a"), recent.last("b"), recent.last("never")) == (5, 7, 0)
    recent.remember("a", 9, now=10.5)  # a new generation begins; "b" is still remembered
    assert (recent.last("a"), recent.last("b")) == (9, 7)
    recent.expire(now=15.0)  # not due yet
    assert recent.last("b") == 7
    recent.expire(now=20.5)  # two windows after its apply, "b" can no longer come back
    assert (recent.last("a"), recent.last("b")) == (9, 0)
    recent.expire(now=31.0)  # idle: memory is given back
    assert len(recent) == 0 and budget.used == 0


def test_recently_applied_memory_is_one_budget_for_every_partition() -> None:
    """64 partitions each applying 10k distinct keys stay within the drain's one budget in bytes
    (it was 100k keys per partition, ~17 MB each); each forgets its own oldest keys first, and a
    partition that ends gives its share back."""
    budget = RecentBudget(256 * 1024)
    partitions = [RecentlyApplied(window=3600.0, budget=budget) for _ in range(64)]
    for i in range(10_000):
        for p, recent in enumerate(partitions):
            recent.remember(f"p{p}-k{i}", i + 1, now=0.0)
            assert recent.last(f"p{p}-k{i}") == i + 1
        assert budget.used <= budget.total + 64 * 200, budget.used  # at most one key over, per partition
    assert budget.used == sum(recent.bytes for recent in partitions)
    assert partitions[0].last("p0-k9999") == 10_000 and partitions[0].last("p0-k0") == 0
    for recent in partitions:
        recent.clear()
    assert budget.used == 0
