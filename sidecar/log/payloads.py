"""Entries whose payload is not on the stream: chunked values and MULTI mutations.

Read back for the drain and for replays alike: the chunk store verifies the digest,
`decode_many` reads a MULTI object.
"""

from __future__ import annotations

import msgspec

from sidecar.envelope import Entry, decode_many
from sidecar.log.chunks import ChunkError, ChunkStore


class PayloadError(Exception):
    """A payload that cannot be read; `permanent` when retrying cannot help (gone or corrupt)."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


def _classified(exc: ChunkError) -> PayloadError:
    text = str(exc)
    gone = "corrupt" in text or "not found" in text.lower()
    if gone:
        text += " (chunked payloads are deleted once every target applied them, or after the replay window)"
    return PayloadError(text, permanent=gone)


async def with_payload(chunks: ChunkStore, entry: Entry) -> Entry:
    """The entry with its value read back from the chunk store, when it was stored there."""
    if entry.chunk is None or entry.value is not None:
        return entry
    try:
        value = await chunks.get(entry.ns, entry.chunk)
    except ChunkError as exc:
        raise _classified(exc) from None
    return msgspec.structs.replace(entry, value=value)


async def expand_multi(chunks: ChunkStore, marker: Entry) -> list[Entry]:
    """A MULTI marker's entries, in the order they were journaled."""
    assert marker.chunk is not None
    try:
        return decode_many(await chunks.get(marker.ns, marker.chunk))
    except ChunkError as exc:
        raise _classified(exc) from None
    except msgspec.DecodeError as exc:
        raise PayloadError(f"undecodable mutation {marker.chunk.object}: {exc}", permanent=True) from None
