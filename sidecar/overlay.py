"""Read your own writes: what this sidecar journaled that the primary target has not applied yet.

A write is acked once it is in the journal; the drain applies it a moment (or, with the
target down, a long while) later. In between, a read relayed to the target would miss it
or see the value before it. The overlay closes that gap for this sidecar's own writes:

* fed when a write is acked durable (`Ingress._ack`): for each PUT / DELETE / TOUCH entry
  addressed to the namespace's primary target, the newest value of its (key, item) — or a
  tombstone for a delete — with flags, expiry and the entry's stream sequence. An older
  sequence never replaces a newer one (acks of two connections can arrive in any order);
* trimmed by the drain's applied notices: the primary target applying sequence >= the
  overlay's sequence for a slot removes it (per key the drain applies in journal order, so
  it then holds that value or a newer one); a dead-lettered entry's notice removes it too;
* bounded: a byte budget per namespace (`overlay_budget`); past it the oldest slots are
  evicted. A read of an evicted key then waits (bounded) for the drain, then reads the
  target (`walcar_overlay_fallback_reads_total`).

It is cold after a restart: entries a previous process journaled become readable when the
drain applies them, as before this existed (docs/memcached.md, "Read your own writes").

Pure logic, no I/O: the fronts ask it and decide what to wait for.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

# Per-slot bytes beyond key, item and value: the slot tuple, the entry object, the dict and
# by-sequence index entries. Measured with tracemalloc on CPython 3.12 (~300 B), rounded up.
SLOT_OVERHEAD: Final = 320

Slot = tuple[str, str]  # (key, item); memcached keys use item ""


class OverlayEntry:
    __slots__ = ("expires_at", "flags", "seq", "size", "value")

    def __init__(self, seq: int, value: bytes | None, flags: int, expires_at: int, size: int) -> None:
        self.seq = seq
        self.value = value  # None: a tombstone (deleted)
        self.flags = flags
        self.expires_at = expires_at  # absolute unix seconds; 0: never
        self.size = size

    def live(self, now: float | None = None) -> bool:
        """A value (not a tombstone) that has not expired."""
        if self.value is None:
            return False
        return not self.expires_at or self.expires_at > (time.time() if now is None else now)

    def ttl(self, now: float | None = None) -> int:
        """Remaining seconds as memcached's `mg t` reports it: -1 when it never expires."""
        if not self.expires_at:
            return -1
        return max(0, int(self.expires_at - (time.time() if now is None else now)))


class NamespaceOverlay:
    """The overlay of one namespace, for one primary target."""

    def __init__(self, primary: str) -> None:
        self.primary = primary
        self.entries: OrderedDict[Slot, OverlayEntry] = OrderedDict()  # oldest write first
        self._by_seq: dict[int, list[Slot]] = {}
        self._items: dict[str, set[str]] = {}  # key -> items other than "" (KV records)
        self.bytes = 0
        self.evictions = 0
        self.fallback_reads = 0

    def __len__(self) -> int:
        return len(self.entries)

    # --- writes ------------------------------------------------------------------

    def put(self, key: str, item: str, seq: int, value: bytes | None, flags: int, expires_at: int,
            budget: int) -> None:
        """A PUT (value) or DELETE (None) acked at `seq`."""
        slot = (key, item)
        old = self.entries.get(slot)
        if old is not None:
            if old.seq > seq:
                return
            self._drop(slot, old)
        size = len(key) + len(item) + (len(value) if value is not None else 0) + SLOT_OVERHEAD
        self.entries[slot] = OverlayEntry(seq, value, flags, expires_at, size)
        self._index(slot, seq)
        if item:
            self._items.setdefault(key, set()).add(item)
        self.bytes += size
        if self.bytes > budget:
            self._evict(budget)

    def touch(self, key: str, item: str, seq: int, expires_at: int) -> None:
        """A TOUCH acked at `seq`: only an overlaid value takes it (else the target has the value
        and gets the touch from the drain; a read of the target meanwhile shows the old TTL)."""
        slot = (key, item)
        old = self.entries.get(slot)
        if old is None or old.seq > seq:
            return
        self._unindex(slot, old.seq)
        old.seq = seq
        old.expires_at = expires_at
        self._index(slot, seq)
        self.entries.move_to_end(slot)

    def _index(self, slot: Slot, seq: int) -> None:
        slots = self._by_seq.get(seq)
        if slots is None:
            self._by_seq[seq] = [slot]
        else:  # the entries of one MULTI marker share its sequence
            slots.append(slot)

    def _unindex(self, slot: Slot, seq: int) -> None:
        slots = self._by_seq.get(seq)
        if slots is None:
            return
        if len(slots) == 1:
            del self._by_seq[seq]
        else:
            slots.remove(slot)

    def _drop(self, slot: Slot, entry: OverlayEntry) -> None:
        del self.entries[slot]
        self._unindex(slot, entry.seq)
        self.bytes -= entry.size
        key, item = slot
        if item:
            items = self._items.get(key)
            if items is not None:
                items.discard(item)
                if not items:
                    del self._items[key]

    def _evict(self, budget: int) -> None:
        entries = self.entries
        while self.bytes > budget and entries:
            slot, entry = next(iter(entries.items()))
            self._drop(slot, entry)
            self.evictions += 1

    def clear(self) -> None:
        self.entries.clear()
        self._by_seq.clear()
        self._items.clear()
        self.bytes = 0

    # --- applied notices ----------------------------------------------------------

    def applied(self, sequences: list[int]) -> None:
        """The primary target applied these sequences: their slots hold that value (or newer) now."""
        by_seq = self._by_seq
        if not by_seq:
            return
        for seq in sequences:
            # -seq: dead-lettered, never to be applied; the target keeps the value before it, so the
            # slot goes too (reads show what the target holds, as they would for another sidecar).
            seq = abs(seq)
            slots = by_seq.get(seq)
            if slots is None:
                continue  # not overlaid, or superseded by a newer write (whose own notice will come)
            for slot in list(slots):
                entry = self.entries.get(slot)
                if entry is not None and entry.seq <= seq:
                    self._drop(slot, entry)

    # --- reads -------------------------------------------------------------------

    def get(self, key: str, item: str = "") -> OverlayEntry | None:
        return self.entries.get((key, item))

    def items_of(self, key: str) -> dict[str, OverlayEntry]:
        """A record's overlaid items, the record-level slot ("") included when overlaid."""
        out: dict[str, OverlayEntry] = {}
        whole = self.entries.get((key, ""))
        if whole is not None:
            out[""] = whole
        for item in self._items.get(key, ()):
            out[item] = self.entries[(key, item)]
        return out


class Overlays:
    """Every namespace's overlay; owned by the Ingress, fed by it and by the applied notices."""

    def __init__(self) -> None:
        self.namespaces: dict[str, NamespaceOverlay] = {}

    def of(self, namespace: str, primary: str) -> NamespaceOverlay:
        overlay = self.namespaces.get(namespace)
        if overlay is None or overlay.primary != primary:
            # New, or the primary changed live: what the old one knew is about another target.
            overlay = self.namespaces[namespace] = NamespaceOverlay(primary)
        return overlay

    def drop(self, namespace: str) -> None:
        """read_your_writes switched off (or the namespace went): nothing may be served from it
        again, since the notices that would trim it are no longer matched to it."""
        overlay = self.namespaces.pop(namespace, None)
        if overlay is not None:
            overlay.clear()

    def applied(self, namespace: str, target: str, sequences: list[int]) -> None:
        overlay = self.namespaces.get(namespace)
        if overlay is not None and overlay.primary == target:
            overlay.applied(sequences)
