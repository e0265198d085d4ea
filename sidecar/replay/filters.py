"""What a replay reads and what it leaves out: parsing of bounds and exclusions, and the predicate.

Sans-I/O, so every rule is property-tested on values. Times are integers in
nanoseconds since the epoch (JetStream's stream timestamps); write times are the
entry's microseconds.

- A bound (`--from`, `--to`) is a time — RFC3339 with a zone (`2026-05-01T08:00:00Z`,
  `...+02:00`), relative to now (`-2h`, `-1h30m`, `-90s`), `now` — or a stream
  sequence `seq:N`. `--from`/`--to` select by *stream* time (when the entry was
  journaled), which is what JetStream can seek by.
- Exclusions, any number of each, OR-ed: an entry is left out when one rule matches,
  and the first matching rule is reported as the reason.
  `--exclude-key GLOB`     fnmatch (case-sensitive) on the entry's key; for a KV item
                           also on `key/item`, so `user:42` drops the whole record and
                           `user:42/email` only that item
  `--exclude-seq A-B`      stream sequences A..B inclusive (`A` alone: just A); the
                           entries of a MULTI mutation carry their marker's sequence
  `--exclude-op OP`        put, delete, touch or cql
  `--exclude-origin GLOB`  the region the write entered walcar
  `--exclude-window T1..T2` by the entry's *write time*, T1..T2 inclusive (the window a
                           bad deploy wrote in, as the application saw it)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase

from sidecar.envelope import Entry, Op
from sidecar.units import Duration

NS_PER_US = 1000
NS_PER_S = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RELATIVE_RE = re.compile(r"^-((?:\d+(?:\.\d+)?(?:us|µs|ms|s|m|h|d))+)$")
_RELATIVE_PART_RE = re.compile(r"\d+(?:\.\d+)?(?:us|µs|ms|s|m|h|d)")
_SEQ_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
EXCLUDABLE_OPS = (Op.PUT, Op.DELETE, Op.TOUCH, Op.CQL)


class FilterError(ValueError):
    """A bound or exclusion an operator typed that means nothing; the message says what is wrong."""


def format_time(ns: int) -> str:
    """RFC3339 in UTC with microseconds: what every replay message and summary prints."""
    micros = ns // NS_PER_US
    seconds = datetime.fromtimestamp(micros // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{micros % 1_000_000:06d}Z"


def parse_time(text: str, now_ns: int) -> int:
    """A time (RFC3339 with a zone, `-2h`-style relative, or `now`) -> ns since the epoch."""
    value = text.strip()
    if value == "now":
        return now_ns
    relative = _RELATIVE_RE.match(value)
    if relative:
        seconds = sum(float(Duration.parse(part)) for part in _RELATIVE_PART_RE.findall(relative.group(1)))
        return now_ns - round(seconds * NS_PER_S)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(
            f"{text!r} is not a time: use RFC3339 (2026-05-01T08:00:00Z), a relative time (-2h, -1h30m) or now"
        ) from None
    if moment.tzinfo is None:
        raise FilterError(f"{text!r} has no time zone: add Z (UTC) or an offset such as +02:00")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * NS_PER_US


@dataclass(frozen=True, slots=True)
class SeqBound:
    seq: int

    def __str__(self) -> str:
        return f"seq:{self.seq}"


@dataclass(frozen=True, slots=True)
class TimeBound:
    ns: int

    def __str__(self) -> str:
        return format_time(self.ns)


Bound = SeqBound | TimeBound


def parse_bound(text: str, now_ns: int) -> Bound:
    """`seq:N` or a time."""
    value = text.strip()
    if value.startswith("seq:"):
        digits = value[4:].strip()
        if not digits.isdigit() or int(digits) < 1:
            raise FilterError(f"{text!r}: a sequence bound is seq:N with N >= 1")
        return SeqBound(int(digits))
    return TimeBound(parse_time(value, now_ns))


def parse_seq_range(text: str) -> tuple[int, int]:
    """`A-B` (inclusive) or `A` -> (A, B)."""
    match = _SEQ_RANGE_RE.match(text)
    if not match:
        raise FilterError(f"--exclude-seq {text!r}: expected A-B (stream sequences, inclusive) or A")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if first > last:
        raise FilterError(f"--exclude-seq {text!r}: the range must go up (A <= B)")
    return first, last


def parse_window(text: str, now_ns: int) -> tuple[int, int]:
    """`T1..T2` -> (start, end) in ns, inclusive."""
    start, sep, end = text.partition("..")
    if not sep or not start.strip() or not end.strip():
        raise FilterError(f"--exclude-window {text!r}: expected T1..T2 (two times joined by '..')")
    first, last = parse_time(start, now_ns), parse_time(end, now_ns)
    if first > last:
        raise FilterError(f"--exclude-window {text!r}: T1 is after T2")
    return first, last


def parse_op(text: str) -> Op:
    value = text.strip().lower()
    for op in EXCLUDABLE_OPS:
        if value == op.value:
            return op
    allowed = ", ".join(op.value for op in EXCLUDABLE_OPS)
    raise FilterError(f"--exclude-op {text!r}: expected one of {allowed}")


# --- rules -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyGlob:
    pattern: str

    def matches(self, seq: int, entry: Entry) -> bool:
        if fnmatchcase(entry.key, self.pattern):
            return True
        return bool(entry.item) and fnmatchcase(f"{entry.key}/{entry.item}", self.pattern)

    def label(self) -> str:
        return f"--exclude-key {self.pattern}"


@dataclass(frozen=True, slots=True)
class SeqRange:
    first: int
    last: int

    def matches(self, seq: int, entry: Entry) -> bool:
        return self.first <= seq <= self.last

    def label(self) -> str:
        return f"--exclude-seq {self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class OpIs:
    op: Op

    def matches(self, seq: int, entry: Entry) -> bool:
        return entry.op is self.op

    def label(self) -> str:
        return f"--exclude-op {self.op.value}"


@dataclass(frozen=True, slots=True)
class OriginGlob:
    pattern: str

    def matches(self, seq: int, entry: Entry) -> bool:
        return fnmatchcase(entry.origin, self.pattern)

    def label(self) -> str:
        return f"--exclude-origin {self.pattern}"


@dataclass(frozen=True, slots=True)
class WriteWindow:
    start_ns: int
    end_ns: int

    def matches(self, seq: int, entry: Entry) -> bool:
        return self.start_ns <= entry.write_time * NS_PER_US <= self.end_ns

    def label(self) -> str:
        return f"--exclude-window {format_time(self.start_ns)}..{format_time(self.end_ns)}"


Rule = KeyGlob | SeqRange | OpIs | OriginGlob | WriteWindow


@dataclass(frozen=True, slots=True)
class Filters:
    """Every exclusion of a job, OR-ed; `reason` names the first rule that drops an entry."""

    rules: tuple[Rule, ...] = field(default=())

    def reason(self, seq: int, entry: Entry) -> str | None:
        for rule in self.rules:
            if rule.matches(seq, entry):
                return rule.label()
        return None

    def labels(self) -> list[str]:
        return [rule.label() for rule in self.rules]


def build_filters(
    *,
    keys: Sequence[str] = (),
    seqs: Sequence[str] = (),
    ops: Sequence[str] = (),
    origins: Sequence[str] = (),
    windows: Sequence[str] = (),
    now_ns: int,
) -> Filters:
    """Parse every exclusion option; raises FilterError naming the first bad one."""
    rules: list[Rule] = []
    for pattern in keys:
        if not pattern:
            raise FilterError("--exclude-key needs a pattern")
        rules.append(KeyGlob(pattern))
    rules.extend(SeqRange(*parse_seq_range(text)) for text in seqs)
    rules.extend(OpIs(parse_op(text)) for text in ops)
    for pattern in origins:
        if not pattern:
            raise FilterError("--exclude-origin needs a region (or a glob)")
        rules.append(OriginGlob(pattern))
    rules.extend(WriteWindow(*parse_window(text, now_ns)) for text in windows)
    return Filters(tuple(rules))


def key_prefix(key: str) -> str:
    """The key up to and including its first delimiter (`:` `/` `.` `-` `_` `#`): the dry run's grouping."""
    for index, char in enumerate(key):
        if char in ":/.-_#":
            return key[: index + 1]
    return "(no delimiter)"
