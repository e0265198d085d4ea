"""nats-server configured for production-like tests: TLS (mTLS), users, tokens, accounts.

The test writes the server's config file (with certificates it generated) and starts its own
nats-server with it: the shared server is never touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.pki import Authority, Pair, issue
from tests.support.procs import NatsProcess


def tls_block(ca: Authority, server: Pair, workdir: Path, *, verify: bool = True,
              handshake_first: bool = False) -> str:
    ca_file = ca.write(workdir / "server-ca.pem")
    lines = [f"cert_file: {json.dumps(str(server.cert))}", f"key_file: {json.dumps(str(server.key))}",
             f"ca_file: {json.dumps(str(ca_file))}", f"verify: {str(verify).lower()}", "timeout: 2"]
    if handshake_first:
        lines.append("handshake_first: true")
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"


def configured_nats(workdir: Path, body: str, port: int | None = None) -> NatsProcess:
    """A nats-server (JetStream on) with `body` as its config file; not started."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    conf.write_text(body)
    return NatsProcess(workdir, port=port, extra_args=["-c", str(conf)])


def tls_nats(workdir: Path, ca: Authority, *, verify: bool = True, handshake_first: bool = False,
             expired: bool = False, extra: str = "", port: int | None = None) -> NatsProcess:
    """TLS-only nats-server whose certificate `ca` signed; `verify`: clients need a certificate `ca` signed."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = issue(ca, workdir / "server.pem", workdir / "server-key.pem", common_name="nats.test", expired=expired)
    return configured_nats(workdir, tls_block(ca, server, workdir, verify=verify, handshake_first=handshake_first)
                           + extra, port=port)


# What walcar needs inside its own account, and nothing else (docs/security.md repeats it).
WALCAR_PUBLISH = [
    "wal.>", "waldlq.>", "walapplied.>",  # journal, dead letters, applied notices
    "$JS.API.>",  # stream, consumer, KV and object-store management and pulls (scoped to the account)
    "$JS.ACK.>",  # acks of drained entries
    # control buckets; the leases bucket's name carries drain.lease_ttl in ms (10s by default)
    "$KV.walcar_state.>", "$KV.walcar_leases_10000ms.>", "$KV.walcar_chunkrefs.>",
    "$O.*.>",  # chunked values (walchunks_<namespace> object stores)
]
WALCAR_SUBSCRIBE = ["_INBOX.>", "walapplied.>"]


def walcar_permissions() -> str:
    return ("permissions: { publish: { allow: " + json.dumps(WALCAR_PUBLISH) + " }, subscribe: { allow: "
            + json.dumps(WALCAR_SUBSCRIBE) + " } }")


def account_block(users: str) -> str:
    """One account with JetStream, holding `users` (a nats-server users list body)."""
    return "accounts {\n  WALCAR {\n    jetstream: enabled\n    users: [\n" + users + "\n    ]\n  }\n}\n"
