"""The last write of every item in a range: what `--last-value-only` replays and `verify` expects.

Sans-I/O. A first pass over the range `observe`s every entry that survived the
filters; a second pass `keeps` only each item's last PUT or DELETE and the TOUCHes
after it (a touch changes the expiry of the value before it). CQL entries are
always kept: a statement may change any columns, and with their write timestamps
replaying all of them ends in the same state. Memory is one position per item,
never the values.
"""

from __future__ import annotations

from sidecar.envelope import Entry, Op

Position = tuple[int, int]  # (stream sequence, index inside a MULTI mutation)
ItemKey = tuple[str, str]  # (key, item); item "" is the record itself


class LastWrites:
    def __init__(self) -> None:
        self.anchors: dict[ItemKey, Position] = {}
        self.record_deletes: dict[str, Position] = {}  # the last whole-record delete of each key

    def observe(self, position: Position, entry: Entry) -> None:
        item = (entry.key, entry.item)
        if entry.op is Op.PUT or entry.op is Op.DELETE:
            self.anchors[item] = position
            if entry.op is Op.DELETE and not entry.item:
                self.record_deletes[entry.key] = position
        elif entry.op is Op.TOUCH:
            self.anchors.setdefault(item, position)  # no value in range: its touches still matter

    def keeps(self, position: Position, entry: Entry) -> bool:
        if entry.op not in (Op.PUT, Op.DELETE, Op.TOUCH):
            return True
        anchor = self.anchors.get((entry.key, entry.item))
        return anchor is not None and position >= anchor

    def records(self) -> list[str]:
        """Every record key written in the range, in first-seen order."""
        return list(dict.fromkeys(key for key, _ in self.anchors))
