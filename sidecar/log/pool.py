"""The servers a NATS link may connect to, kept the way nats.go and nats-py keep them.

- The configured URLs are shuffled once per process: a fleet of sidecars restarting
  together does not all dial URL #1 (no thundering herd on one node).
- Servers the cluster announces in INFO `connect_urls` join the pool, so a sidecar given
  one URL of three still fails over to the other two.
- A server that announced lame-duck mode is skipped while others remain, for as long as a
  lame-duck period lasts.
- After a failed round over the whole pool, the wait grows (up to a cap) plus random
  jitter, so reconnecting clients spread out instead of arriving in waves.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

RECONNECT_WAIT: Final = 0.5  # after the first failed round
RECONNECT_MAX: Final = 2.0
RECONNECT_JITTER: Final = 0.25  # up to this much more, at random
LAME_DUCK_AVOID: Final = 120.0  # nats-server's default lame-duck duration


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    tls: bool
    user: str | None = None
    password: str | None = None
    token: str | None = None
    discovered: bool = False
    tls_name: str | None = None  # for a discovered IP over TLS: the name the certificate carries

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def parse_servers(url: str) -> list[Server]:
    """`nats://[user:pass@|token@]host[:port]`, `tls://...`, comma-separated, as nats-py takes them."""
    servers = []
    for part in url.split(","):
        part = part.strip()
        if "://" not in part:
            part = "nats://" + part
        split = urlsplit(part)
        if split.scheme not in ("nats", "tls"):
            raise ValueError(f"unsupported NATS URL scheme {split.scheme!r} in {part!r}")
        user = unquote(split.username) if split.username else None
        password = unquote(split.password) if split.password else None
        token = user if user is not None and password is None else None
        servers.append(Server(split.hostname or "127.0.0.1", split.port or 4222, split.scheme == "tls",
                              None if token else user, password, token))
    return servers


def backoff(failed_rounds: int) -> float:
    """The wait after `failed_rounds` (>= 1) rounds over the pool without a connection."""
    base = min(RECONNECT_WAIT * 2 ** min(failed_rounds - 1, 8), RECONNECT_MAX)
    return base + random.uniform(0, RECONNECT_JITTER)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ServerPool:
    def __init__(self, url: str, randomize: bool = True) -> None:
        self.servers = parse_servers(url)
        if randomize:
            random.shuffle(self.servers)
        self._next = 0
        self._lame: dict[tuple[str, int], float] = {}  # address -> until when it is avoided

    def __len__(self) -> int:
        return len(self.servers)

    def pick(self) -> Server:
        """The next server in turn, passing over lame ducks while any other is left."""
        now = time.monotonic()
        self._lame = {address: until for address, until in self._lame.items() if until > now}
        for _ in range(len(self.servers)):
            server = self.servers[self._next % len(self.servers)]
            self._next += 1
            if server.address not in self._lame:
                return server
        server = self.servers[self._next % len(self.servers)]
        self._next += 1
        return server

    def lame_duck(self, server: Server) -> None:
        self._lame[server.address] = time.monotonic() + LAME_DUCK_AVOID

    def discover(self, connect_urls: list[str], current: Server) -> list[Server]:
        """Add the cluster's announced client URLs (`host:port`) not in the pool yet; returns them."""
        known = {s.address for s in self.servers}
        added = []
        for text in connect_urls:
            host, _, port = text.rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or (host, int(port)) in known:
                continue
            tls_name = current.tls_name or current.host if current.tls and _is_ip(host) else None
            server = Server(host, int(port), current.tls, current.user, current.password, current.token,
                            discovered=True, tls_name=tls_name)
            known.add(server.address)
            added.append(server)
        random.shuffle(added)
        self.servers.extend(added)
        return added
