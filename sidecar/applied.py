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
# Bytes the unapplied keys may take (sidecar.unapplied_budget). A key costs about SLOT_BYTES plus
# its length however often it is rewritten: only its latest sequence is kept (a key's entries apply
# in order, so the latest applied means every earlier one is done). With no drain reporting back
# (none configured, or all down for long) the oldest keys are forgotten past the budget rather than
# growing without bound; a conditional op on a forgotten key then does not wait for it (the same as
# a key written by another sidecar).
DEFAULT_UNAPPLIED_BUDGET = 16 * 1024 * 1024
# Measured with tracemalloc (CPython 3.11, 64-bit; 379 B a key of 12 characters): the slot tuple,
# its OrderedDict entry, the sequence, the sequence -> keys entry and the key string's header.
SLOT_BYTES = 368


def applied_subject(namespace: str, target: str) -> str:
    return APPLIED_SUBJECT.format(namespace=namespace, target=target)


class _TargetView:
    __slots__ = ("recent", "recent_order", "waiters")

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.recent_order: deque[int] = deque()
        self.waiters: dict[int, trio.Event] = {}


class AppliedTracker:
    def __init__(self, budget: int = DEFAULT_UNAPPLIED_BUDGET) -> None:
        self._targets: dict[tuple[str, str], _TargetView] = {}
        # (namespace, target, key) -> the latest sequence this sidecar journaled for the key and
        # `target` has not applied; the oldest keys first
        self._unapplied: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        # (namespace, target, sequence) -> the key (or keys) whose latest unapplied entry it is. Several
        # keys share a sequence when every entry of a MULTI mutation carries its marker's; a set only
        # then, since a set per key would be most of a key's cost.
        self._keys_of: dict[tuple[str, str, int], str | set[str]] = {}
        self.budget = budget
        self.bytes = 0  # SLOT_BYTES + len(key) per unapplied key
        self.forgotten = 0  # keys dropped to stay within the budget
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
            latest = self._unapplied.get(slot)
            if latest is None:
                self._unapplied[slot] = sequence
                self.bytes += SLOT_BYTES + len(key)
                while self.bytes > self.budget and len(self._unapplied) > 1:
                    self._forget_oldest()
            elif sequence > latest:  # acks of one key's writes can come out of order
                self._unapplied[slot] = sequence
                self._unindex(namespace, target, latest, key)
            else:
                continue
            index = (namespace, target, sequence)
            keys = self._keys_of.get(index)
            if keys is None:
                self._keys_of[index] = key
            elif isinstance(keys, set):
                keys.add(key)
            elif keys != key:
                self._keys_of[index] = {keys, key}

    def _keys(self, namespace: str, target: str, sequence: int) -> list[str]:
        keys = self._keys_of.get((namespace, target, sequence))
        if keys is None:
            return []
        return [keys] if isinstance(keys, str) else list(keys)

    def _unindex(self, namespace: str, target: str, sequence: int, key: str) -> None:
        index = (namespace, target, sequence)
        keys = self._keys_of.get(index)
        if keys == key:
            del self._keys_of[index]
        elif isinstance(keys, set):
            keys.discard(key)
            if len(keys) == 1:
                self._keys_of[index] = keys.pop()

    def _forget_oldest(self) -> None:
        (namespace, target, key), sequence = self._unapplied.popitem(last=False)
        self._unindex(namespace, target, sequence, key)
        self.bytes -= SLOT_BYTES + len(key)
        self.forgotten += 1

    def _drop(self, namespace: str, target: str, key: str) -> None:
        sequence = self._unapplied.pop((namespace, target, key), None)
        if sequence is not None:
            self._unindex(namespace, target, sequence, key)
            self.bytes -= SLOT_BYTES + len(key)

    def is_applied(self, namespace: str, target: str, sequence: int) -> bool:
        """Whether a notice for `sequence` already came (it can beat the write's own ack)."""
        view = self._targets.get((namespace, target))
        return view is not None and sequence in view.recent

    def has_unapplied(self, namespace: str, target: str, key: str) -> bool:
        return (namespace, target, key) in self._unapplied

    async def wait_key_applied(self, namespace: str, target: str, key: str, timeout: float) -> bool:
        """True once every entry this sidecar journaled for `key` is applied by `target`."""
        with trio.move_on_after(timeout):
            while True:
                latest = self._unapplied.get((namespace, target, key))
                if latest is None:
                    return True
                if await self.wait_applied(namespace, target, latest, timeout):
                    # Applied (maybe before this waited: no checkpoint then): this entry and the key's
                    # earlier ones are done, so the loop moves on whatever the index says.
                    self._clear_through(namespace, target, key, latest)
        return (namespace, target, key) not in self._unapplied

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
            for key in self._keys(namespace, target, sequence):
                self._clear_through(namespace, target, key, sequence)
        while len(view.recent_order) > _RECENT:
            view.recent.discard(view.recent_order.popleft())

    def _settled(self, namespace: str, target: str, sequence: int) -> None:
        """Dead-lettered: a conditional op on its key need not wait for it; a `sync` waiter wakes and
        answers visible=false (the sequence is not among the applied ones)."""
        event = self._targets.get((namespace, target), _TargetView()).waiters.pop(sequence, None)
        if event is not None:
            event.set()
        # The keys whose latest entry it is: their earlier ones were settled before it, in order.
        for key in self._keys(namespace, target, sequence):
            self._drop(namespace, target, key)

    def _clear_through(self, namespace: str, target: str, key: str, sequence: int) -> None:
        """Entries of a key apply in order: this one and every earlier one are done."""
        latest = self._unapplied.get((namespace, target, key))
        if latest is not None and latest <= sequence:
            self._drop(namespace, target, key)
