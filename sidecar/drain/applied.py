"""Which journaled entries the drain has applied, as the ingress side learns it.

Drainers publish an applied notice per round (`walapplied.<ns>.<target>`, a msgpack
list of stream sequences). The ingress uses it twice:

- `sync` namespaces answer `visible: true` once the primary target applied the entry;
- conditional operations (memcached incr/cas/..., CQL IF) on a key first wait until
  this sidecar's earlier entries for that key are applied, so they never compute on
  a value the target has not seen yet.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

import trio

APPLIED_SUBJECT = "walapplied.{namespace}.{target}"
_RECENT = 65_536  # applied sequences remembered per target, for notices that beat the waiter
# Keys tracked as unapplied at most. With no drain reporting back (none configured, or all down
# for long), the oldest are forgotten rather than growing without bound; a conditional op on a
# forgotten key then does not wait for it (the same as a key written by another sidecar).
MAX_TRACKED_KEYS = 200_000


def applied_subject(namespace: str, target: str) -> str:
    return APPLIED_SUBJECT.format(namespace=namespace, target=target)


class _TargetView:
    __slots__ = ("recent", "recent_order", "waiters")

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.recent_order: deque[int] = deque()
        self.waiters: dict[int, trio.Event] = {}


class AppliedTracker:
    def __init__(self) -> None:
        self._targets: dict[tuple[str, str], _TargetView] = {}
        # (namespace, target, key) -> sequences this sidecar journaled and `target` has not applied, oldest first
        self._unapplied: OrderedDict[tuple[str, str, str], list[int]] = OrderedDict()
        self._key_of: dict[tuple[str, str, int], str] = {}
        # Told every notice too: the read-your-writes overlay trims itself with them (Ingress wires it).
        self.on_applied: Callable[[str, str, list[int]], None] | None = None

    def _view(self, namespace: str, target: str) -> _TargetView:
        view = self._targets.get((namespace, target))
        if view is None:
            view = self._targets[(namespace, target)] = _TargetView()
        return view

    # --- called by the ingress ------------------------------------------------

    def journaled(self, namespace: str, key: str, sequence: int, targets: list[str]) -> None:
        """This sidecar journaled `sequence` for `key`; unapplied for each of `targets` until notices say so."""
        if sequence <= 0:
            return
        for target in targets:
            if sequence in self._view(namespace, target).recent:
                continue  # the notice beat the ack
            slot = (namespace, target, key)
            pending = self._unapplied.get(slot)
            if pending is None:
                pending = self._unapplied[slot] = []
                if len(self._unapplied) > MAX_TRACKED_KEYS:
                    self._forget_oldest()
            pending.append(sequence)
            self._key_of[(namespace, target, sequence)] = key

    def _forget_oldest(self) -> None:
        (namespace, target, _), sequences = self._unapplied.popitem(last=False)
        for sequence in sequences:
            self._key_of.pop((namespace, target, sequence), None)

    def is_applied(self, namespace: str, target: str, sequence: int) -> bool:
        """Whether a notice for `sequence` already came (it can beat the write's own ack)."""
        view = self._targets.get((namespace, target))
        return view is not None and sequence in view.recent

    def has_unapplied(self, namespace: str, target: str, key: str) -> bool:
        return bool(self._unapplied.get((namespace, target, key)))

    async def wait_key_applied(self, namespace: str, target: str, key: str, timeout: float) -> bool:
        """True once every entry this sidecar journaled for `key` is applied by `target`."""
        with trio.move_on_after(timeout):
            while True:
                pending = self._unapplied.get((namespace, target, key))
                if not pending:
                    return True
                await self.wait_applied(namespace, target, pending[-1], timeout)
        return not self._unapplied.get((namespace, target, key))

    async def wait_applied(self, namespace: str, target: str, sequence: int, timeout: float) -> bool:
        """True when `target` applied `sequence` within `timeout` seconds."""
        view = self._view(namespace, target)
        if sequence in view.recent:
            return True
        event = view.waiters.get(sequence)
        if event is None:
            event = view.waiters[sequence] = trio.Event()
        with trio.move_on_after(timeout):
            await event.wait()
        if view.waiters.get(sequence) is event and not event.is_set():
            del view.waiters[sequence]
        return sequence in view.recent

    # --- called with each notice ---------------------------------------------

    def applied(self, namespace: str, target: str, sequences: list[int]) -> None:
        """A notice: each sequence `target` applied; a negative one (-seq) was dead-lettered instead —
        settled, so nothing waits for it any longer, but never visible."""
        if self.on_applied is not None:
            self.on_applied(namespace, target, sequences)
        view = self._view(namespace, target)
        for sequence in sequences:
            if sequence < 0:
                self._settled(namespace, target, -sequence)
                continue
            if sequence in view.recent:
                continue
            view.recent.add(sequence)
            view.recent_order.append(sequence)
            event = view.waiters.pop(sequence, None)
            if event is not None:
                event.set()
            key = self._key_of.pop((namespace, target, sequence), None)
            if key is not None:
                self._clear_through(namespace, target, key, sequence)
        while len(view.recent_order) > _RECENT:
            view.recent.discard(view.recent_order.popleft())

    def _settled(self, namespace: str, target: str, sequence: int) -> None:
        """Dead-lettered: a conditional op on its key need not wait for it; a `sync` waiter wakes and
        answers visible=false (the sequence is not among the applied ones)."""
        event = self._targets.get((namespace, target), _TargetView()).waiters.pop(sequence, None)
        if event is not None:
            event.set()
        key = self._key_of.pop((namespace, target, sequence), None)
        if key is None:
            return
        slot = (namespace, target, key)
        pending = [s for s in self._unapplied.get(slot, []) if s != sequence]
        if pending:
            self._unapplied[slot] = pending
        else:
            self._unapplied.pop(slot, None)

    def _clear_through(self, namespace: str, target: str, key: str, sequence: int) -> None:
        """Entries of a key apply in order: this one and every earlier one are done."""
        slot = (namespace, target, key)
        pending = self._unapplied.get(slot, [])
        remaining = [s for s in pending if s > sequence]
        for done in pending:
            if done <= sequence:
                self._key_of.pop((namespace, target, done), None)
        if remaining:
            self._unapplied[slot] = remaining
        else:
            self._unapplied.pop(slot, None)
