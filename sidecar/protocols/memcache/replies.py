"""Canned answers of the memcached front, and SERVER_ERROR lines built from a reason."""

from __future__ import annotations

from typing import Final

from sidecar import __version__

from .codec import encode_server_error, encode_version

__all__ = ["BUSY_MESSAGE", "DELETED", "STORED", "TOUCHED", "VERSION_ANSWER", "server_error"]

STORED: Final = b"STORED\r\n"
DELETED: Final = b"DELETED\r\n"
TOUCHED: Final = b"TOUCHED\r\n"
VERSION_ANSWER: Final = encode_version(f"walcar-{__version__}")
BUSY_MESSAGE: Final = "busy: earlier writes to this key are not applied yet"


def server_error(message: str) -> bytes:
    """A SERVER_ERROR line; the reason is flattened to one line (it may quote a multi-line error)."""
    return encode_server_error(" ".join(message.split()) or "error")
