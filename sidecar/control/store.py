"""Namespaces kept in NATS: one validated document per namespace in the KV bucket `walcar_namespaces`.

The bucket is the live half of the control plane (the config file is the other): a
namespace stored here overrides the file's namespace of the same name in every
sidecar that follows the bucket. A document is the namespace exactly as the config
file writes it, plus who applied it and when; it is validated with the config's own
structs on the way in (`walcar ns apply`) and again on the way out (a document
written by hand is never half-applied). The bucket keeps each key's last 64
revisions: `walcar ns history` and `rollback` read them.
"""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

import msgspec

from sidecar import config as config_mod
from sidecar.config import Namespace, stream_name
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.log.kvread import kv_history, kv_latest

BUCKET = "walcar_namespaces"
HISTORY = 64  # the most JetStream keeps per key
STREAM_NOT_FOUND = 10059


class ControlError(Exception):
    """A change that cannot be made (invalid, unsafe, or someone else changed it first)."""


class NamespaceDoc(msgspec.Struct, kw_only=True, omit_defaults=True):
    namespace: dict[str, Any]  # as in the config file's [namespaces.NAME]
    applied_by: str = ""
    applied_at: str = ""  # RFC3339


class Stored(msgspec.Struct, kw_only=True):
    """One revision of a namespace's key: a valid namespace, an invalid document, or a deletion."""

    name: str
    revision: int
    doc: NamespaceDoc | None = None  # None: deleted at this revision
    ns: Namespace | None = None
    error: str = ""  # why the document is not a valid namespace


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return "unknown"


def validate_namespace(name: str, raw: object) -> Namespace:
    """A namespace document -> Namespace, with the same errors `walcar config check` gives."""
    try:
        return config_mod.validate({"namespaces": {name: raw}}).namespaces[name]
    except config_mod.ConfigError as exc:
        raise ControlError("; ".join(exc.errors)) from None


def stamp_now(raw: dict[str, Any], at: str) -> dict[str, Any]:
    """`start = "now"` on a target becomes the time of the apply, so every sidecar starts it at one point."""
    targets = [dict(t) if isinstance(t, dict) else t for t in raw.get("targets") or []]
    for target in targets:
        if isinstance(target, dict) and target.get("start") == "now":
            target["start"] = at
    return {**raw, "targets": targets} if "targets" in raw else raw


def to_document(ns: Namespace) -> dict[str, Any]:
    return msgspec.to_builtins(ns, enc_hook=config_mod.enc_hook)


def unsafe_changes(name: str, old: Namespace | None, new: Namespace, stream: dict[str, Any] | None) -> list[str]:
    """What cannot change while the namespace exists, each with the migration to do instead."""
    problems = []
    live_partitions = None
    live_replicas = None
    if stream is not None:
        metadata = (stream.get("config") or {}).get("metadata") or {}
        if metadata.get("walcar.partitions", "").isdigit():
            live_partitions = int(metadata["walcar.partitions"])
        live_replicas = (stream.get("config") or {}).get("num_replicas")
    if old is not None:
        live_partitions = live_partitions or old.partitions
        live_replicas = live_replicas or old.replicas
    if live_partitions is not None and new.partitions != live_partitions:
        problems.append(f"partitions: {live_partitions} -> {new.partitions} cannot change live (keys are hashed "
                        f"with it): create a new namespace and move writers to it, or drain {name}, delete "
                        f"stream {stream_name(name)} and apply again")
    if live_replicas is not None and new.replicas != live_replicas:
        problems.append(f"replicas: {live_replicas} -> {new.replicas} is not changed by walcar: change the "
                        f"stream's replicas with the nats CLI (`nats stream edit {stream_name(name)} "
                        f"--replicas {new.replicas}`), then apply")
    if old is not None:
        for target in new.targets:
            before = old.target(target.name)
            if before is not None and type(before) is not type(target):
                problems.append(f"targets.{target.name}: its type cannot change (its drain position would be "
                                "reused): add the new target under another name and remove this one")
    return problems


class NamespaceStore:
    def __init__(self, conn: NatsConnection, replicas: int = 1) -> None:
        self.conn = conn
        self.replicas = replicas
        self.kv: Any = None

    async def open(self) -> None:
        self.kv = await self.conn.key_value(BUCKET, history=HISTORY, replicas=self.replicas)

    def decode(self, key: str, revision: int, value: bytes | None, operation: str | None) -> Stored:
        if operation in ("DEL", "PURGE") or not value:
            return Stored(name=key, revision=revision)
        try:
            doc = msgspec.json.decode(value, type=NamespaceDoc)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Stored(name=key, revision=revision, error=f"not a namespace document: {exc}")
        try:
            return Stored(name=key, revision=revision, doc=doc, ns=validate_namespace(key, doc.namespace))
        except ControlError as exc:
            return Stored(name=key, revision=revision, doc=doc, error=str(exc))

    async def get(self, name: str) -> Stored | None:
        kv = self.kv

        async def read() -> Any:
            try:
                return await kv.get(name)
            except Exception:  # nats-py: KeyNotFoundError / KeyDeletedError
                return None

        entry = await self.conn.bridge.run(read)
        if entry is None:
            return None
        return self.decode(name, entry.revision, entry.value, getattr(entry, "operation", None))

    async def latest(self) -> list[Stored]:
        """Every namespace document the bucket holds now, by name. From the bucket's stream: nats-py's
        listing misses a present key now and then (kvread.py)."""
        return [self.decode(r.key, r.revision, r.value, r.operation) for r in await kv_latest(self.conn, BUCKET)]

    async def history(self, name: str) -> list[Stored]:
        return [self.decode(name, r.revision, r.value, r.operation) for r in await kv_history(self.conn, BUCKET, name)]

    async def put(self, name: str, ns: Namespace, expected: int) -> int:
        """Write with optimistic concurrency: `expected` is the revision read (0: the key must not exist)."""
        doc = NamespaceDoc(namespace=to_document(ns), applied_by=who(), applied_at=now_rfc3339())
        value = msgspec.json.encode(doc)
        kv = self.kv

        async def write() -> int:
            if expected == 0:
                return int(await kv.create(name, value))
            return int(await kv.update(name, value, last=expected))

        try:
            return await self.conn.bridge.run(write)
        except Exception as exc:  # wrong last sequence / key exists: someone else applied first
            raise ControlError(f"{name} changed since revision {expected} ({type(exc).__name__}: {exc}); "
                               "read it again and re-apply") from None

    async def delete(self, name: str, expected: int) -> None:
        kv = self.kv

        async def remove() -> None:
            await kv.delete(name, last=expected)

        try:
            await self.conn.bridge.run(remove)
        except Exception as exc:
            raise ControlError(f"{name} changed since revision {expected}: {exc}") from None

    async def stream_info(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.conn.js_api(f"STREAM.INFO.{stream_name(name)}")
        except JetStreamApiError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                return None
            raise

    async def unapplied(self, name: str) -> int:
        """Entries of the namespace's journal some consumer has not acked yet (0 without a stream)."""
        if await self.stream_info(name) is None:
            return 0
        listing = await self.conn.js_api(f"CONSUMER.LIST.{stream_name(name)}", {"offset": 0})
        return sum(int(c.get("num_pending", 0)) + int(c.get("num_ack_pending", 0))
                   for c in listing.get("consumers") or [])
