"""Each key's last applied sequence, for as long as an older entry of it can still come back.

An entry applied but whose ack was lost is redelivered after AckWait. Applying it again would
put an older value back over a newer one on a target without write timestamps (memcached),
so the partition skips (and acks) any delivery not newer than its key's last apply. A key
has to be remembered only that long: two generations of plain dicts, the older dropped every
AckWait, keep each key for one to two AckWaits after its last apply. A generation that reaches
`cap` keys is retired early, so a burst over many keys shortens the window instead of growing
memory (at most 2 × cap keys).
"""

from __future__ import annotations

GENERATION_CAP = 50_000  # keys; with 50-byte keys a full generation is ~9 MB


class RecentlyApplied:
    def __init__(self, window: float, cap: int = GENERATION_CAP) -> None:
        self.window = window
        self.cap = cap
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._retire_at = 0.0

    def last(self, key: str) -> int:
        """The key's last applied sequence while remembered, else 0."""
        seq = self._current.get(key)
        return self._previous.get(key, 0) if seq is None else seq

    def remember(self, key: str, seq: int, now: float) -> None:
        if now >= self._retire_at or len(self._current) >= self.cap:
            self.expire(now, force=True)
        self._current[key] = seq

    def expire(self, now: float, force: bool = False) -> None:
        """Retire a generation when one is due (also called while idle, so memory is given back)."""
        if force or now >= self._retire_at:
            self._previous, self._current = self._current, {}
            self._retire_at = now + self.window

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
