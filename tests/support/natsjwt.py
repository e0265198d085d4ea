"""Operator-mode NATS for tests: an operator, a system account and walcar's account, as nsc would make them.

Keys and JWTs are made here with `nkeys` (the `walcar[nkeys]` extra): the server trusts the
operator, preloads the account JWTs (MEMORY resolver), and walcar signs in with a `.creds`
file holding a user JWT and that user's seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Identity:
    def __init__(self, prefix: int) -> None:
        self.seed = nkeys.encode_seed(os.urandom(32), prefix)
        self.keys = nkeys.from_seed(bytearray(self.seed))
        self.public = self.keys.public_key.decode()


def sign_jwt(issuer: Identity, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject,
                              "nats": {**nats, "version": 2}}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()) \
        .decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = issuer.keys.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
             "leaf": -1}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def operator_setup(workdir: Path) -> tuple[str, Path]:
    """(nats-server config body, path of walcar's .creds file)."""
    operator = Identity(nkeys.PREFIX_BYTE_OPERATOR)
    system, account = Identity(nkeys.PREFIX_BYTE_ACCOUNT), Identity(nkeys.PREFIX_BYTE_ACCOUNT)
    user = Identity(nkeys.PREFIX_BYTE_USER)
    operator_jwt = sign_jwt(operator, operator.public, "test-operator",
                            {"type": "operator", "system_account": system.public})
    system_jwt = sign_jwt(operator, system.public, "SYS", {"type": "account", "limits": UNLIMITED})
    account_jwt = sign_jwt(operator, account.public, "WALCAR",
                           {"type": "account", "limits": {**UNLIMITED, **JETSTREAM}})
    user_jwt = sign_jwt(account, user.public, "walcar",
                        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    creds = workdir / "walcar.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    creds.chmod(0o600)
    body = (f"operator: {operator_jwt}\nsystem_account: {system.public}\nresolver: MEMORY\n"
            f"resolver_preload: {{\n  {system.public}: {system_jwt}\n  {account.public}: {account_jwt}\n}}\n")
    return body, creds
