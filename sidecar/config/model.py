"""Namespaces, listeners and the sidecar's own settings, and the Config that holds them all."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from sidecar.config.targets import (
    DEFAULT_MAX_ITEM_SIZE,
    CassandraTls,
    MemcachedTarget,
    RetryPolicy,
    Target,
    _Base,
)
from sidecar.secrets import redact_urls
from sidecar.units import ByteSize, Duration

NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_PARTITIONS = 1024


class Namespace(_Base):
    # async: ack after the journal; sync: also wait (bounded) for the primary target; off: the WAL is
    # switched off, the memcached and CQL fronts write straight to the target (docs/control-plane.md).
    mode: Literal["async", "sync", "off"] = "async"
    visibility_budget: Duration = Duration(0.05)
    partitions: int = 16
    replay_window: Duration = Duration(72 * 3600.0)
    duplicate_window: Duration = Duration(120.0)
    replicas: int = 1
    chunk_threshold: ByteSize = ByteSize(256 * 1024)
    # The largest value a client may write; default: the smallest item size of the namespace's
    # memcached targets, else 16 MiB (see item_limit).
    max_item_size: ByteSize | None = None
    # A client-given write time further than this from the sidecar's clock is refused.
    write_time_drift: Duration = Duration(3600.0)
    dlq: bool = True
    # strict: later entries of a key wait behind a dead-lettered one instead of passing it.
    strict: bool = False
    # relay: forward entries that came from another region to this namespace's wal targets.
    relay: bool = False
    primary: str | None = None  # target that serves reads and sync visibility; default: first
    # Reads through this sidecar (memcached get/gets/gat/gats/mg, KV GET) see its own acked writes
    # before the primary target applied them (sidecar/overlay.py, docs/memcached.md).
    read_your_writes: bool = True
    # Bytes the read-your-writes overlay may hold (key + value + ~320 B a slot); past it the oldest
    # slots are evicted and their reads wait up to visibility_budget for the drain instead.
    overlay_budget: ByteSize = ByteSize(16 * 1024 * 1024)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    targets: list[Target] = msgspec.field(default_factory=list)

    def primary_target(self) -> Target | None:
        if self.primary is not None:
            return next((t for t in self.targets if t.name == self.primary), None)
        return self.targets[0] if self.targets else None

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    def item_limit(self) -> int:
        """The largest value a front accepts: `max_item_size`, or what every memcached target can store."""
        if self.max_item_size is not None:
            return int(self.max_item_size)
        sizes = [int(t.max_item_size) for t in self.targets if isinstance(t, MemcachedTarget)]
        return min(sizes) if sizes else DEFAULT_MAX_ITEM_SIZE


class ListenerTls(_Base):
    """A kv listener served over HTTPS; the pair is re-read when it changes (a rotated Secret)."""

    cert_file: str
    key_file: str
    reload_interval: Duration = Duration(10.0)  # how often the files are checked for a change


class Listener(_Base):
    protocol: Literal["memcached", "cql", "kv"]
    bind: str
    namespace: str | None = None  # kv serves every namespace by path
    # cql: the Cassandra cluster reads and schema go to; default: the namespace's cassandra target.
    upstream: list[str] | None = None
    data_center: str = "datacenter1"
    rack: str = "rack1"
    # kv: a bearer token every route but /healthz, /openapi.json and the cross-region /batch needs
    # (that one takes sidecar.region_token_file). Required when `bind` is beyond loopback.
    token_file: str | None = None
    # Limits (docs/configuration.md, "Limits"): each bounds what one client can make the sidecar hold.
    # connections served at once; more are accepted and closed at once (counted).
    max_connections: int = 128
    # a connection that sends nothing for this long is closed; 0: never (kv: HTTP keep-alive's 75 s,
    # and a kv client that reads none of its answers for this long is let go too).
    idle_timeout: Duration = Duration(0.0)
    # memcached, cql, kv: bytes of large requests (values, frames, bodies of 64 KiB or more) the listener holds at once.
    partial_budget: ByteSize = ByteSize(16 * 1024 * 1024)
    # memcached, cql, kv: how long a large request waits for room in partial_budget before it is refused.
    partial_wait: Duration = Duration(2.0)
    # cql: the largest frame (Cassandra's native_transport_max_frame_size), after decompression too.
    max_frame_size: ByteSize = ByteSize(16 * 1024 * 1024)
    # cql: the largest frame before the connection is READY (authenticated, when auth is on).
    preauth_frame_size: ByteSize = ByteSize(64 * 1024)
    # kv: the largest request body (after gzip decompression).
    max_body: ByteSize = ByteSize(8 * 1024 * 1024)
    # kv: the largest JSON request body (parsed in one step on the event loop: ~2 ms a MiB).
    max_json_body: ByteSize = ByteSize(2 * 1024 * 1024)
    # kv: entries one request may make (items of a put, keys of a delete, over all mutations).
    max_items: int = 10_000
    # cql: TLS to the upstream; default: the namespace's cassandra target's `tls`.
    upstream_tls: CassandraTls | None = None
    tls: ListenerTls | None = None  # kv: serve HTTPS


class JournalSettings(_Base):
    publish_timeout: Duration = Duration(2.0)
    max_inflight_bytes: ByteSize = ByteSize(32 * 1024 * 1024)
    max_inflight_entries: int = 20_000
    max_batch_entries: int = 512
    # Entries of one partition a message may hold (a pack: sidecar/envelope.py); 1: one entry a message, as
    # walcar before packs wrote, which is what sidecars of such a version can read (see operations.md).
    pack_entries: int = 64
    # Ingress sheds writes (503 / SERVER_ERROR / Overloaded) while acks are this slow.
    shed_ack_latency: Duration = Duration(1.0)


class DrainSettings(_Base):
    lease_ttl: Duration = Duration(10.0)  # a dead drainer's partitions move after at most this long
    ack_wait: Duration = Duration(30.0)  # JetStream redelivery timeout; held entries send +WPI well before
    max_inflight: int = 1000  # entries held per partition (bounds memory, whatever the backlog)
    # Bytes of held entries, all partitions of all targets together (split evenly): what bounds
    # the drain's memory for large values; sized so the Helm chart's 256Mi pod limit holds.
    max_held_bytes: ByteSize = ByteSize(32 * 1024 * 1024)
    fetch_batch: int = 256
    max_run: int = 64  # entries of one key applied in one round


class NatsTls(_Base):
    """TLS to NATS with the operator's CA; every file is re-read at the next (re)connect after it changes."""

    ca_file: str | None = None  # PEM CA bundle the server's certificate must chain to; default: system roots
    cert_file: str | None = None  # PEM client certificate (mTLS), with its chain
    key_file: str | None = None  # PEM key of cert_file
    server_name: str | None = None  # name the server's certificate must carry; default: the URL's host
    handshake_first: bool = False  # TLS before the server's INFO (nats-server `handshake_first: true`)


class SidecarSettings(_Base):
    region: str = "local"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds: str | None = None
    nats_tls: NatsTls | None = None
    nats_user: str | None = None  # with nats_password_file
    nats_password_file: str | None = None
    nats_token_file: str | None = None
    # bytes waiting for the socket to NATS; beyond it writes are refused (durable=false) until it drains
    nats_max_pending: ByteSize = ByteSize(16 * 1024 * 1024)
    # Bytes spent remembering which keys this sidecar journaled that a target has not applied yet
    # (~370 B + the key's length a key, however often it is rewritten): conditional ops and reads past
    # an evicted overlay slot wait for them. Past it the oldest keys are forgotten (not waited for).
    unapplied_budget: ByteSize = ByteSize(16 * 1024 * 1024)
    # The memory the sidecar must fit in: `walcar run` refuses a config whose budgets could hold
    # more (sidecar/memory_budget.py). Default: the container's cgroup limit; "0": no check.
    memory_limit: ByteSize | None = None
    admin: str = "127.0.0.1:9901"
    metrics: str | None = None  # a separate scrape address; /metrics stays on admin too
    # Bearer token for admin mutations and for reads that reveal values or config. Required when
    # `admin` is beyond loopback; `admin_token_create` makes the file (random token) when it is missing.
    admin_token_file: str | None = None
    admin_token_create: bool = False
    # Bearer token other regions must present on POST /v1/log/{ns}/batch; without it the endpoint is off.
    region_token_file: str | None = None
    shutdown_grace: Duration = Duration(2.0)
    shutdown_deadline: Duration = Duration(30.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    journal: JournalSettings = msgspec.field(default_factory=JournalSettings)
    drain: DrainSettings = msgspec.field(default_factory=DrainSettings)


class Config(_Base):
    sidecar: SidecarSettings = msgspec.field(default_factory=SidecarSettings)
    listeners: list[Listener] = msgspec.field(default_factory=list)
    namespaces: dict[str, Namespace] = msgspec.field(default_factory=dict)

    def namespace(self, name: str) -> Namespace | None:
        return self.namespaces.get(name)


class ConfigError(Exception):
    """Every problem found in a config document, each prefixed with its path."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = [redact_urls(error) for error in errors]
        self.source = source
        super().__init__("\n".join(self.errors))



def stream_name(namespace: str) -> str:
    return f"WAL_{namespace.upper()}"
