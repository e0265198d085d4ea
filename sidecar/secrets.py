"""Secrets and who may ask: bearer tokens, redaction, and what counts as a loopback address.

One module so that every listener checks a token the same way (constant time, a
`Bearer` scheme, an empty token never matching) and every place that prints a URL
hides the credentials inside it.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import re
import secrets
from pathlib import Path

REDACTED = "<redacted>"
# `scheme://user:password@host`, `scheme://token@host`: everything between :// and the authority's
# last @ is a credential (a password may hold an @ of its own: URL parsers split at the last one).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def redact_urls(text: str) -> str:
    """Credentials inside any URL of `text` replaced by <redacted> (the host and path stay)."""
    if "@" not in text:
        return text
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, :: and every other address or name."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SecretFileError(Exception):
    pass


def read_token_file(path: str, create: bool = False) -> str:
    """A token from a file (surrounding white space dropped). With `create`, a missing file is made
    with a fresh random token, readable only by this user; an empty file is an error either way."""
    file = Path(path)
    if create and not file.exists():
        token = secrets.token_urlsafe(32)
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        return token
    try:
        token = file.read_text().strip()
    except OSError as exc:
        raise SecretFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise SecretFileError(f"token file {path} is empty")
    return token


def bearer_matches(authorization: bytes | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not authorization or not token:
        return False
    return hmac.compare_digest(authorization, b"Bearer " + token.encode())


def browser_refusal(headers: dict[bytes, bytes], has_token: bool) -> str | None:
    """Why an HTTP request must be refused as a browser's, or None.

    Any `Origin` header means a browser sent it (a page of any site can POST to localhost);
    and without a token, a `Host` that is not loopback means a DNS-rebound name or a proxy
    (a page whose own name now points at 127.0.0.1 could read answers otherwise)."""
    if b"origin" in headers:
        return "browser requests are refused (an Origin header came with it)"
    if not has_token and not _loopback_host(headers.get(b"host", b"")):
        return "without a token only requests to a loopback Host are served"
    return None


@functools.lru_cache(maxsize=64)
def _loopback_host(host_header: bytes) -> bool:
    """`is_loopback` of a Host header, remembered: a client sends the same one on every request, and
    parsing the address is a tenth of a KV write's own CPU. Bounded: a client varying it costs a miss."""
    return is_loopback(host_of(host_header))


def host_of(host_header: bytes) -> str:
    """The host of a Host header ("127.0.0.1:9901", "[::1]:9901", "localhost") without its port."""
    host = host_header.decode("latin-1").strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
