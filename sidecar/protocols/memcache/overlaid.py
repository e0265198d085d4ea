"""memcached reads answered from the read-your-writes overlay (sidecar/overlay.py).

What each read returns for a key this sidecar wrote and memcached has not got yet
(docs/memcached.md, "Read your own writes"):

* get / gat, mg with only v f t s k O q b: the overlaid value, flags and remaining TTL,
  without asking memcached; a delete (or an expired value) answers a miss. gat/gats
  journal the new TTL of such hits like any other hit.
* gets / gats / mg c: the CAS unique is memcached's, which exists only once the value is
  there, so the read first waits (up to the namespace's visibility_budget) for the drain
  to apply the key, then asks memcached: the CAS stays truthful. If the wait runs out (a
  backlog, memcached down) the overlaid value is answered with CAS 0, which memcached
  never gives an item, so a `cas` with it answers EXISTS rather than overwriting blindly.
* mg with any other flag (h, l, N, E, T, R, u, ...): memcached's own state is the answer,
  so it waits like `c`, then asks memcached (stale if the wait ran out).
* a key whose overlay slot was evicted (the byte budget) waits the same way, then asks
  memcached (counted in walcar_overlay_fallback_reads_total).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

import trio

from sidecar.ingress import Ingress
from sidecar.memcache_keys import entry_key
from sidecar.overlay import NamespaceOverlay

from .codec import encode_meta_response
from .commands import MetaGet, ValueItem

# mg flags the overlay can answer truthfully by itself (c is answered after a bounded wait).
_MG_SELF: Final = frozenset("vftskOqb")
_MG_WITH_CAS: Final = _MG_SELF | {"c"}


def consulted(overlay: NamespaceOverlay | None) -> bool:
    """Whether reads must look at the overlay at all: it holds something, or evicted something
    whose reads must wait. An empty overlay costs a read nothing more."""
    return overlay is not None and bool(overlay.entries or overlay.evictions)


async def _wait_applied(ingress: Ingress, namespace: str, overlay: NamespaceOverlay, keys: Iterable[str]) -> None:
    """Wait, all keys within one visibility_budget, for the primary target to apply them."""
    budget = float(ingress.namespace(namespace).visibility_budget)
    deadline = trio.current_time() + budget
    applied = ingress.applied
    for key in keys:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return
        await applied.wait_key_applied(namespace, overlay.primary, key, remaining)


async def retrieve(ingress: Ingress, namespace: str, overlay: NamespaceOverlay, keys: list[bytes],
                   with_cas: bool) -> dict[bytes, ValueItem | None]:
    """Raw keys the overlay answers: a hit (ValueItem) or a miss (None); the others go to memcached."""
    applied = ingress.applied
    waits: list[str] = []
    for key in keys:
        journal_key = entry_key(key)
        entry = overlay.get(journal_key)
        if entry is None:
            if overlay.evictions and applied.has_unapplied(namespace, overlay.primary, journal_key):
                overlay.fallback_reads += 1
                waits.append(journal_key)
        elif with_cas and entry.live():
            waits.append(journal_key)
    if waits:
        await _wait_applied(ingress, namespace, overlay, waits)
    now = time.time()
    answered: dict[bytes, ValueItem | None] = {}
    for key in keys:
        entry = overlay.get(entry_key(key))
        if entry is not None:
            # CAS 0 when the wait ran out: never an item's CAS in memcached (see the module doc).
            answered[key] = ValueItem(key, entry.flags, entry.value, 0) if entry.live(now) else None  # type: ignore[arg-type]
    return answered


async def meta_get(ingress: Ingress, namespace: str, overlay: NamespaceOverlay, cmd: MetaGet) -> bytes | None:
    """The answer to an mg from the overlay, or None: ask memcached (after any wait it needed)."""
    journal_key = entry_key(cmd.key)
    entry = overlay.get(journal_key)
    if entry is None:
        if overlay.evictions and ingress.applied.has_unapplied(namespace, overlay.primary, journal_key):
            overlay.fallback_reads += 1
            await _wait_applied(ingress, namespace, overlay, (journal_key,))
        return None
    flags = cmd.flags
    if not _MG_SELF.issuperset(flags):
        await _wait_applied(ingress, namespace, overlay, (journal_key,))
        entry = overlay.get(journal_key)
        if entry is None or not _MG_WITH_CAS.issuperset(flags):
            return None
    if not entry.live():
        return encode_meta_response(cmd, b"EN")
    value = entry.value
    assert value is not None
    return encode_meta_response(cmd, b"VA" if "v" in flags else b"HD", value=value if "v" in flags else None,
                                client_flags=entry.flags, ttl=entry.ttl(), size=len(value),
                                cas=0 if "c" in flags else None)
