"""Which memcached server of a target holds a key: shared by the front's reads and the drain's writes.

Both sides must pick the same server for a key, or a read would look where the
drain never wrote. The choice is pymemcache's `RendezvousHash` over the target's
"host:port" strings, hashing the key as text (UTF-8 when it decodes, else
latin-1), which is also what a pymemcache `HashClient` app talking to the same
servers directly would pick for its str keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from pymemcache.client.rendezvous import RendezvousHash

__all__ = ["hash_text", "server_for_key"]


@lru_cache(maxsize=64)
def _ring(servers: tuple[str, ...]) -> RendezvousHash:
    return RendezvousHash(list(servers))


def hash_text(key: bytes) -> str:
    """The text the ring hashes for a raw memcached key."""
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return key.decode("latin-1")


def server_for_key(servers: Sequence[str], key: bytes) -> str:
    """The "host:port" of `servers` that owns the raw memcached `key` (as sent on the wire, decoded if base64)."""
    if len(servers) == 1:
        return servers[0]
    if not servers:
        raise ValueError("a memcached target needs at least one server")
    return _ring(tuple(servers)).get_node(hash_text(key))
