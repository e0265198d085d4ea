"""Replay bounds and exclusions: parsing and the composed predicate, as properties."""

from __future__ import annotations

import glob
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sidecar.envelope import Entry, Op
from sidecar.replay.filters import (
    NS_PER_S,
    NS_PER_US,
    FilterError,
    Filters,
    KeyGlob,
    OpIs,
    OriginGlob,
    SeqBound,
    SeqRange,
    TimeBound,
    WriteWindow,
    build_filters,
    format_time,
    key_prefix,
    parse_bound,
    parse_seq_range,
    parse_time,
    parse_window,
)
from sidecar.replay.lastvalue import LastWrites
from sidecar.replay.throttle import Throttle

NOW = 1_780_000_000 * NS_PER_S
UNITS = {"us": 1_000, "ms": 1_000_000, "s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S,
         "d": 86_400 * NS_PER_S}

moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)),
                                                  timezone(timedelta(hours=-7, minutes=-30))]))
keys = st.text(alphabet="abc:/-_*?[]!x0", min_size=1, max_size=12)
entries = st.builds(
    lambda op, key, item, origin, write_time: Entry(id="i", ns="n", op=op, key=key, partition=0, item=item,
                                                    origin=origin, write_time=write_time),
    st.sampled_from([Op.PUT, Op.DELETE, Op.TOUCH, Op.CQL]), keys, st.sampled_from(["", "a", "b/c"]),
    st.sampled_from(["", "us-east-1", "eu-west-1"]), st.integers(0, 2**52),
)
rules = st.one_of(
    st.builds(KeyGlob, keys),
    st.builds(lambda a, n: SeqRange(a, a + n), st.integers(1, 1000), st.integers(0, 1000)),
    st.builds(OpIs, st.sampled_from([Op.PUT, Op.DELETE, Op.TOUCH, Op.CQL])),
    st.builds(OriginGlob, st.sampled_from(["us-*", "eu-west-1", "*"])),
    st.builds(lambda a, n: WriteWindow(a * NS_PER_US, (a + n) * NS_PER_US), st.integers(0, 2**52),
              st.integers(0, 2**40)),
)


@given(moments)
def test_rfc3339_times_parse_to_their_instant(moment: datetime) -> None:
    expected = int((moment - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1)) * NS_PER_US
    assert parse_time(moment.isoformat(), NOW) == expected
    assert parse_time(format_time(expected), NOW) == expected  # what replay prints, it reads back


@given(st.integers(0, 10_000), st.sampled_from(sorted(UNITS)))
def test_relative_times_count_back_from_now(amount: int, unit: str) -> None:
    assert parse_time(f"-{amount}{unit}", NOW) == NOW - amount * UNITS[unit]


def test_compound_relative_times_and_now() -> None:
    assert parse_time("-1h30m", NOW) == NOW - 90 * 60 * NS_PER_S
    assert parse_time("now", NOW) == NOW


@given(st.text(max_size=30))
def test_any_text_is_a_bound_or_a_filter_error(text: str) -> None:
    try:
        bound = parse_bound(text, NOW)
    except FilterError as exc:
        assert str(exc)  # says what is wrong
    else:
        assert isinstance(bound, SeqBound | TimeBound)


def test_a_time_without_a_zone_is_refused() -> None:
    with pytest.raises(FilterError, match="no time zone"):
        parse_time("2026-05-01T08:00:00", NOW)


@given(st.integers(1, 2**62))
def test_sequence_bounds(seq: int) -> None:
    assert parse_bound(f"seq:{seq}", NOW) == SeqBound(seq)


@pytest.mark.parametrize("text", ["seq:0", "seq:", "seq:-3", "seq:x"])
def test_bad_sequence_bounds(text: str) -> None:
    with pytest.raises(FilterError):
        parse_bound(text, NOW)


@given(st.integers(1, 2**62), st.integers(1, 2**62))
def test_sequence_ranges_go_up(a: int, b: int) -> None:
    if a <= b:
        assert parse_seq_range(f"{a}-{b}") == (a, b)
    else:
        with pytest.raises(FilterError, match="must go up"):
            parse_seq_range(f"{a}-{b}")
    assert parse_seq_range(str(a)) == (a, a)


@given(moments, moments)
def test_windows_are_ordered_pairs(first: datetime, second: datetime) -> None:
    start, end = parse_time(first.isoformat(), NOW), parse_time(second.isoformat(), NOW)
    text = f"{first.isoformat()}..{second.isoformat()}"
    if start <= end:
        assert parse_window(text, NOW) == (start, end)
    else:
        with pytest.raises(FilterError, match="after"):
            parse_window(text, NOW)


@given(st.lists(rules, max_size=5), entries, st.integers(1, 3000))
def test_an_entry_is_excluded_by_the_first_rule_that_matches(chosen: list, entry: Entry, seq: int) -> None:
    filters = Filters(tuple(chosen))
    matching = [rule for rule in chosen if rule.matches(seq, entry)]
    assert filters.reason(seq, entry) == (matching[0].label() if matching else None)


@given(entries, st.integers(1, 3000))
def test_no_exclusions_exclude_nothing(entry: Entry, seq: int) -> None:
    assert Filters().reason(seq, entry) is None


@given(entries, st.integers(0, 2**52), st.integers(0, 2**40))
def test_a_window_excludes_exactly_the_write_times_inside_it(entry: Entry, start: int, length: int) -> None:
    window = WriteWindow(start * NS_PER_US, (start + length) * NS_PER_US)
    assert window.matches(1, entry) == (start <= entry.write_time <= start + length)


@given(entries, st.integers(1, 100), st.integers(0, 100), st.integers(1, 300))
def test_a_sequence_range_excludes_exactly_its_sequences(entry: Entry, first: int, length: int, seq: int) -> None:
    assert SeqRange(first, first + length).matches(seq, entry) == (first <= seq <= first + length)


@given(entries)
def test_a_literal_key_glob_matches_its_record_and_its_items(entry: Entry) -> None:
    literal = KeyGlob(glob.escape(entry.key))
    assert literal.matches(1, entry)
    if entry.item:
        assert KeyGlob(glob.escape(f"{entry.key}/{entry.item}")).matches(1, entry)
        other = Entry(id="i", ns="n", op=Op.PUT, key=entry.key, item=entry.item + "z", partition=0, write_time=0)
        assert not KeyGlob(glob.escape(f"{entry.key}/{entry.item}")).matches(1, other)


def test_build_filters_parses_every_option_and_names_bad_ones() -> None:
    filters = build_filters(keys=["user:*"], seqs=["10-20"], ops=["DELETE"], origins=["eu-*"],
                            windows=["2026-05-01T08:00:00Z..2026-05-01T09:00:00Z"], now_ns=NOW)
    assert filters.labels() == ["--exclude-key user:*", "--exclude-seq 10-20", "--exclude-op delete",
                                "--exclude-origin eu-*",
                                "--exclude-window 2026-05-01T08:00:00.000000Z..2026-05-01T09:00:00.000000Z"]
    with pytest.raises(FilterError, match="--exclude-op 'upsert'"):
        build_filters(ops=["upsert"], now_ns=NOW)
    with pytest.raises(FilterError, match="--exclude-window"):
        build_filters(windows=["2026-05-01T08:00:00Z"], now_ns=NOW)


@given(st.text(alphabet="ab:-/.", max_size=10))
def test_key_prefix_is_a_prefix_up_to_the_first_delimiter(key: str) -> None:
    prefix = key_prefix(key)
    if prefix != "(no delimiter)":
        assert key.startswith(prefix) and prefix[-1] in ":/.-_#"
        assert not any(c in ":/.-_#" for c in prefix[:-1])
    else:
        assert not any(c in ":/.-_#" for c in key)


@given(st.lists(st.tuples(st.sampled_from(["k1", "k2"]), st.sampled_from(["", "a"]),
                          st.sampled_from([Op.PUT, Op.DELETE, Op.TOUCH])), max_size=20))
def test_last_writes_keep_each_items_last_put_or_delete_and_the_touches_after_it(ops: list) -> None:
    written = [Entry(id=str(i), ns="n", op=op, key=k, item=item, partition=0, write_time=i)
               for i, (k, item, op) in enumerate(ops)]
    tracker = LastWrites()
    for i, entry in enumerate(written):
        tracker.observe((i, 0), entry)
    kept = [entry for i, entry in enumerate(written) if tracker.keeps((i, 0), entry)]
    for item in {(e.key, e.item) for e in written}:
        mine = [e for e in written if (e.key, e.item) == item]
        writes = [i for i, e in enumerate(mine) if e.op is not Op.TOUCH]
        expected = mine[writes[-1]:] if writes else mine
        assert [e for e in kept if (e.key, e.item) == item] == expected


@given(st.floats(1, 10_000), st.lists(st.integers(1, 500), min_size=1, max_size=30))
def test_the_throttle_holds_the_average_rate(rate: float, batches: list[int]) -> None:
    throttle = Throttle(rate)
    now = 0.0
    for size in batches:
        now += throttle.delay(size, now)  # wait as told, then apply at once
    total = sum(batches)
    assume(total > batches[0])
    assert now == pytest.approx((total - batches[-1]) / rate, rel=1e-6)
    assert Throttle(0).delay(10**6, 5.0) == 0.0
