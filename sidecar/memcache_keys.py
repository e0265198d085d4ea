"""Memcached keys as the journal stores them, and which server of a target holds one.

Shared by the memcached front (protocols/memcache) and the memcached target (drain/targets):
both must encode a key and pick its server the same way, and neither may import the other.

Entry keys are msgpack strings, so a memcached key becomes text:

* a key that is valid UTF-8 without spaces or control characters is stored as is;
* anything else (binary keys of meta commands with the ``b`` flag, non-UTF-8 bytes)
  is stored as ``b64:<base64 of the raw key>``; so is a key that itself starts with
  ``b64:``, so the mapping is reversible. The drain decodes the prefix back.

Both forms of the same raw key (text command, or meta command with a base64 key
that decodes to the same bytes) map to one entry key, so per-key ordering holds.
"""

from __future__ import annotations

import base64
import itertools
import re
import secrets
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from pymemcache.client.rendezvous import RendezvousHash

BINARY_KEY_PREFIX: Final = "b64:"
THIRTY_DAYS: Final = 30 * 24 * 3600
EXPIRED: Final = -1  # an expiry already in the past: the item is gone at once

_unsafe: Final = re.compile(r"[\x00-\x20\x7f]").search
# What memcached's text protocol (and pymemcache, which the drain uses) cannot carry in a key:
# ASCII whitespace splits the command line, NUL ends it. memcached takes other control
# characters (memaslap sends them), so they are not refused.
_splits_key: Final = re.compile(rb"[\x00\t\n\x0b\x0c\r ]").search
MAX_KEY_LENGTH: Final = 250
# memcached 1.6 refuses an item whose header + key + value is over its item size (-I): the
# item struct (48 bytes), the CAS (8), the key's NUL (1), the value's CRLF (2), and 4 bytes
# of client flags when they are not 0 (measured against memcached 1.6: exact to the byte).
ITEM_OVERHEAD: Final = 48 + 8 + 1 + 2
FLAGS_OVERHEAD: Final = 4

__all__ = [
    "BINARY_KEY_PREFIX",
    "EXPIRED",
    "MAX_KEY_LENGTH",
    "absolute_expiry",
    "entry_key",
    "hash_text",
    "item_size",
    "key_problem",
    "memcached_key",
    "new_entry_id",
    "server_for_key",
    "target_key",
    "ttl_to_expiry",
]


def entry_key(raw: bytes) -> str:
    """The journal key for a raw memcached key."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith(BINARY_KEY_PREFIX) and _unsafe(text) is None:
        return text
    return BINARY_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def memcached_key(key: str) -> bytes:
    """The raw memcached key of a journal key (inverse of `entry_key`)."""
    if key.startswith(BINARY_KEY_PREFIX):
        return base64.b64decode(key[len(BINARY_KEY_PREFIX):])
    return key.encode("utf-8")


def target_key(key: str, item: str = "") -> bytes:
    """The key a memcached target stores an entry under: the raw key, or `<key>/<item>` for a
    KV item. Raises ValueError for a `b64:` key that is not base64."""
    raw = memcached_key(key)
    return raw + b"/" + item.encode() if item else raw


def key_problem(raw: bytes) -> str | None:
    """Why memcached could never store `raw` as a key, or None when it can."""
    if not raw:
        return "is empty"
    if len(raw) > MAX_KEY_LENGTH:
        return f"is {len(raw)} bytes, over memcached's {MAX_KEY_LENGTH}"
    if _splits_key(raw) is not None:
        return "contains a space, a line break or another character that splits memcached's command line"
    return None


def item_size(raw_key: bytes, value_length: int, flags: int = 0) -> int:
    """The bytes memcached counts against its item size (-I) for this key and value."""
    return ITEM_OVERHEAD + len(raw_key) + value_length + (FLAGS_OVERHEAD if flags else 0)


def absolute_expiry(exptime: int, now: float | None = None) -> int:
    """Memcached's exptime as absolute unix seconds: 0 never, `EXPIRED` if already past.

    Like memcached: up to 30 days is relative to now, more is an absolute unix time,
    negative means expired. Converting at ingress keeps a late replay from extending a TTL.
    """
    if exptime == 0:
        return 0
    if exptime < 0:
        return EXPIRED
    current = int(now if now is not None else time.time())
    if exptime <= THIRTY_DAYS:
        return current + exptime
    return exptime if exptime > current else EXPIRED


def ttl_to_expiry(ttl: int, now: float | None = None) -> int:
    """A remaining TTL as memcached reports it (mg `t`: -1 never) as absolute unix seconds."""
    if ttl < 0:
        return 0
    current = int(now if now is not None else time.time())
    return current + max(ttl, 1)  # t0: still there, for less than a second


class _Ids:
    """Entry ids (the journal's dedup token): a random per-process prefix and a counter.

    memcached requests carry no idempotency token, so the id only has to be unique;
    this is several times cheaper than a uuid4 per write (one urandom syscall each)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = "mc" + secrets.token_hex(8)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


new_entry_id = _Ids()


# Server routing. The front (reads) and the drain (writes) must pick the same server
# for a key, or a read would look where the drain never wrote. The choice is pymemcache's
# `RendezvousHash` over the target's "host:port" strings, hashing the key as text (UTF-8
# when it decodes, else latin-1), which is also what a pymemcache `HashClient` app
# talking to the same servers directly would pick for its str keys.


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
