"""The control plane: the sidecar's settings, its listeners and its namespaces.

A config file (TOML or YAML) is decoded into these msgspec structs. Loading never
stops at the first mistake: `validate` walks the raw document against the struct
types and collects every error with its path (``namespaces.a.targets[0].servers:
expected array, got str``), then checks what types cannot say (ports used twice,
listeners naming unknown namespaces, ...). `walcar config check` prints them all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import yaml

from sidecar.secrets import REDACTED, is_loopback, redact_urls
from sidecar.units import ByteSize, Duration, parse_hostport

NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
TARGET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_PARTITIONS = 1024


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=False):
    pass


class RetryPolicy(_Base):
    """Backoff for transient apply errors; after max_attempts the entry is dead-lettered."""

    initial_delay: Duration = Duration(0.1)
    max_delay: Duration = Duration(30.0)
    multiplier: float = 2.0
    max_attempts: int = 20


MEMCACHED_ITEM_SIZE = 1024 * 1024  # memcached's own default item size (-I 1m)
DEFAULT_MAX_ITEM_SIZE = 16 * 1024 * 1024


class _TargetBase(_Base):
    name: str
    # Where a target's drain starts the first time it runs (no consumer yet): "oldest" (the whole
    # retained journal), or an RFC3339 time. `walcar ns apply` turns "now" into the time of the apply,
    # so every sidecar starts a target added live from the same point.
    start: str = "oldest"


class MemcachedTarget(_TargetBase, tag="memcached", tag_field="type", kw_only=True):
    servers: list[str]
    pool_size: int = 8
    timeout: Duration = Duration(1.0)
    # memcached's item size (its -I): an item over it can never be stored, so the front refuses
    # it before journaling. Counts memcached's per-item overhead and the key, as memcached does.
    max_item_size: ByteSize = ByteSize(MEMCACHED_ITEM_SIZE)


class CassandraTls(_Base):
    """TLS to Cassandra (client_encryption_options); files re-read when new connections are made."""

    ca_file: str | None = None  # PEM CA bundle the nodes' certificates chain to; default: system roots
    cert_file: str | None = None  # PEM client certificate, for require_client_auth: true
    key_file: str | None = None
    check_hostname: bool = True  # the node certificate must name the address dialled (IP SAN or DNS)


class CassandraTarget(_TargetBase, tag="cassandra", tag_field="type", kw_only=True):
    contact_points: list[str]
    keyspace: str
    table: str | None = None  # KV items go to <keyspace>.<table>; default: the namespace name
    local_dc: str | None = None
    username: str | None = None
    password_file: str | None = None
    consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "ALL", "EACH_QUORUM"] = "LOCAL_QUORUM"
    timeout: Duration = Duration(5.0)
    create_schema: bool = True
    replication_factor: int = 1
    tls: CassandraTls | None = None


class WalTls(_Base):
    """HTTPS to a remote region's KV listener with the operator's CA; files re-read when they change."""

    ca_file: str | None = None  # PEM CA bundle the remote's certificate chains to; default: system roots
    cert_file: str | None = None  # PEM client certificate, if the remote's ingress asks for one
    key_file: str | None = None


class WalTarget(_TargetBase, tag="wal", tag_field="type", kw_only=True):
    """A remote region's walcar, reached over its KV API."""

    url: str
    token_file: str | None = None
    timeout: Duration = Duration(5.0)
    batch_size: int = 500
    compress_above: ByteSize = ByteSize(64 * 1024)
    tls: WalTls | None = None  # for an https:// url


# Request headers walcar sets itself, or that belong to one connection (RFC 9110 7.6.1): not configurable.
_RESERVED_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                     "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "content-type",
                     "content-encoding", "idempotency-key"}
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class HttpTarget(_TargetBase, tag="http", tag_field="type", kw_only=True):
    """An upstream application that applies each entry itself (docs/targets.md)."""

    url: str  # {namespace} and {key} are replaced (the key percent-encoded: never a path or query of its own)
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    delete_method: Literal["POST", "PUT", "PATCH", "DELETE"] | None = None  # default: `method`
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    token_file: str | None = None  # sent as `Authorization: Bearer <token>`, or in `token_header`
    token_header: str = "authorization"
    ca_file: str | None = None  # PEM bundle to verify the application's certificate (https)
    timeout: Duration = Duration(5.0)
    concurrency: int = 32  # requests in flight at once
    batch: Literal["none", "json", "ndjson"] = "none"  # one request per entry, or many in a JSON array / NDJSON
    max_batch: int = 100  # entries per batched request
    health_url: str | None = None  # probed while the application is away; default: any answer from its host

    not_verifiable: ClassVar[str] = ("the application keeps its own state, which walcar cannot read back; "
                                     "replay (`walcar replay --target NAME`) re-sends with the same Idempotency-Key")

    def describe(self) -> str:
        return f"http {self.method} {self.url}"

    def check(self) -> Iterator[tuple[str, str]]:
        """(field, problem) for what the types cannot say."""
        if not self.url.startswith(("http://", "https://")):
            yield "url", f"expected an http:// or https:// URL, got {self.url!r}"
        else:
            authority = self.url.split("://", 1)[1].split("/", 1)[0]
            if "{" in authority:
                yield "url", "placeholders belong in the path or query, not the host"
            unknown = set(re.findall(r"{([^}]*)}", self.url)) - {"namespace", "key"}
            if unknown:
                yield "url", f"unknown placeholder(s) {sorted(unknown)} (known: {{namespace}}, {{key}})"
        if self.health_url is not None and not self.health_url.startswith(("http://", "https://")):
            yield "health_url", f"expected an http:// or https:// URL, got {self.health_url!r}"
        for header, value in self.headers.items():
            if not _settable_header(header):
                yield "headers", f"{header!r} is not a valid header name, or one walcar or the connection owns"
            if any(c in value for c in "\r\n\0"):
                yield "headers", f"the value of {header!r} holds a line break or NUL"
        if not _settable_header(self.token_header):
            yield "token_header", f"{self.token_header!r} is not a valid header name, or one walcar owns"
        if not 1 <= self.concurrency <= 1024:
            yield "concurrency", f"must be between 1 and 1024, got {self.concurrency}"
        if not 1 <= self.max_batch <= 10_000:
            yield "max_batch", f"must be between 1 and 10000, got {self.max_batch}"


# librdkafka settings the kafka target owns: what makes per-key order and no loss hold.
_KAFKA_OWNED = {"bootstrap.servers", "enable.idempotence", "acks", "request.required.acks", "partitioner",
                "message.timeout.ms", "delivery.timeout.ms", "max.in.flight.requests.per.connection",
                "max.in.flight", "sasl.password"}


class KafkaTarget(_TargetBase, tag="kafka", tag_field="type", kw_only=True):
    """A Kafka topic other systems consume (docs/targets.md); needs `pip install 'walcar[kafka]'`."""

    bootstrap_servers: list[str]
    topic: str  # {namespace} is replaced
    deletes: Literal["tombstone", "header"] = "tombstone"  # a record delete as a null value, or an empty one
    create_topic: bool = False  # create it at start (partitions, replication_factor) when it does not exist
    partitions: int = 8
    replication_factor: int = 1
    timeout: Duration = Duration(10.0)  # delivery timeout: past it, an unanswered entry is retried
    linger: Duration = Duration(0.005)
    compression: Literal["none", "lz4", "zstd", "gzip", "snappy"] = "lz4"
    max_message_size: ByteSize = ByteSize(1024 * 1024)  # larger entries are dead-lettered before sending
    max_buffer: ByteSize = ByteSize(32 * 1024 * 1024)  # the producer's queue (counts against the pod's memory)
    properties: dict[str, str] = msgspec.field(default_factory=dict)  # more librdkafka settings (TLS, SASL, ...)
    password_file: str | None = None  # sasl.password, read from this file

    not_verifiable: ClassVar[str] = ("a topic is a log other systems consume, not a state walcar can read back "
                                     "and compare; replay (`walcar replay --target NAME`) produces again")

    def describe(self) -> str:
        return f"kafka {','.join(self.bootstrap_servers)} topic {self.topic}"

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.bootstrap_servers:
            yield "bootstrap_servers", "needs at least one host:port"
        for index, value in enumerate(self.bootstrap_servers):
            try:
                parse_hostport(value)
            except ValueError as exc:
                yield f"bootstrap_servers[{index}]", str(exc)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", self.topic.replace("{namespace}", "n")):
            yield "topic", f"topic names are letters, digits, '.', '_' and '-' (<= 249), got {self.topic!r}"
        owned = sorted(set(self.properties) & _KAFKA_OWNED)
        if owned:
            yield "properties", f"{owned} are set by walcar (idempotence, acks=all and order depend on them)"
        secrets = sorted(k for k in self.properties if "password" in k or "secret" in k)
        if secrets:  # a config is printed by `config check`: secrets live in files
            yield "properties", f"{secrets} would put a secret in the config (sasl.password: use password_file)"
        if self.partitions < 1 or self.replication_factor < 1:
            yield "partitions", "partitions and replication_factor must be at least 1"


Target = MemcachedTarget | CassandraTarget | WalTarget | HttpTarget | KafkaTarget


def _settable_header(name: str) -> bool:
    lower = name.lower()
    return bool(_HEADER_NAME_RE.match(name)) and lower not in _RESERVED_HEADERS and not lower.startswith("walcar-")


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
    overlay_budget: ByteSize = ByteSize(32 * 1024 * 1024)
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
    max_connections: int = 1024
    # a connection that sends nothing for this long is closed; 0: never (kv: HTTP keep-alive's 75 s).
    idle_timeout: Duration = Duration(0.0)
    # memcached: bytes of partly received values all connections of the listener hold at once.
    partial_budget: ByteSize = ByteSize(32 * 1024 * 1024)
    # memcached: how long a large value waits for room in partial_budget before it is refused.
    partial_wait: Duration = Duration(2.0)
    # cql: the largest frame (Cassandra's native_transport_max_frame_size), after decompression too.
    max_frame_size: ByteSize = ByteSize(16 * 1024 * 1024)
    # cql: the largest frame before the connection is READY (authenticated, when auth is on).
    preauth_frame_size: ByteSize = ByteSize(64 * 1024)
    # kv: the largest request body (after gzip decompression).
    max_body: ByteSize = ByteSize(32 * 1024 * 1024)
    # kv: entries one request may make (items of a put, keys of a delete, over all mutations).
    max_items: int = 10_000
    # cql: TLS to the upstream; default: the namespace's cassandra target's `tls`.
    upstream_tls: CassandraTls | None = None
    tls: ListenerTls | None = None  # kv: serve HTTPS


class JournalSettings(_Base):
    publish_timeout: Duration = Duration(2.0)
    max_inflight_bytes: ByteSize = ByteSize(64 * 1024 * 1024)
    max_inflight_entries: int = 20_000
    max_batch_entries: int = 512
    # Ingress sheds writes (503 / SERVER_ERROR / Overloaded) while acks are this slow.
    shed_ack_latency: Duration = Duration(1.0)


class DrainSettings(_Base):
    lease_ttl: Duration = Duration(10.0)  # a dead drainer's partitions move after at most this long
    ack_wait: Duration = Duration(30.0)  # JetStream redelivery timeout; held entries send +WPI well before
    max_inflight: int = 1000  # entries held per partition (bounds memory, whatever the backlog)
    # Bytes of held entries, all partitions of all targets together (split evenly): what bounds
    # the drain's memory for large values; sized so the Helm chart's 256Mi pod limit holds.
    max_held_bytes: ByteSize = ByteSize(64 * 1024 * 1024)
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
    nats_max_pending: ByteSize = ByteSize(32 * 1024 * 1024)
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


# --- decoding -----------------------------------------------------------------

_CUSTOM = {Duration: Duration.parse, ByteSize: ByteSize.parse}


def dec_hook(tp: type, obj: object) -> object:
    parse = _CUSTOM.get(tp)
    if parse is None:
        raise NotImplementedError(tp)
    return parse(obj)


def enc_hook(obj: object) -> object:
    if isinstance(obj, Duration | ByteSize):
        return str(obj)
    raise NotImplementedError(type(obj))


_JSON_NAMES = {
    msgspec.inspect.IntType: "int",
    msgspec.inspect.FloatType: "float",
    msgspec.inspect.StrType: "str",
    msgspec.inspect.BoolType: "bool",
    msgspec.inspect.NoneType: "null",
    msgspec.inspect.ListType: "array",
    msgspec.inspect.DictType: "object",
    msgspec.inspect.StructType: "object",
}


def _raw_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_name(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.CustomType):
        return "duration" if info.cls is Duration else "size"
    if isinstance(info, msgspec.inspect.LiteralType):
        return " | ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        return " | ".join(_type_name(t) for t in info.types)
    return _JSON_NAMES.get(type(info), type(info).__name__)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _walk(value: object, info: msgspec.inspect.Type, path: str) -> Iterator[str]:
    """Yield one error per problem in `value` against the type `info`."""
    where = path or "(top level)"
    if isinstance(info, msgspec.inspect.UnionType):
        if value is None and any(isinstance(t, msgspec.inspect.NoneType) for t in info.types):
            return
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if structs and structs[0].tag_field is not None:
            yield from _walk_tagged(value, structs, path)
            return
        candidates = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(candidates) == 1:
            yield from _walk(value, candidates[0], path)
            return
        for candidate in candidates:
            if not list(_walk(value, candidate, path)):
                return
        yield f"{where}: expected {_type_name(info)}, got {_raw_name(value)}"
        return
    if isinstance(info, msgspec.inspect.StructType):
        yield from _walk_struct(value, info, path)
        return
    if isinstance(info, msgspec.inspect.ListType):
        if not isinstance(value, list):
            yield f"{where}: expected array, got {_raw_name(value)}"
            return
        for index, item in enumerate(value):
            yield from _walk(item, info.item_type, _join(path, index))
        return
    if isinstance(info, msgspec.inspect.DictType):
        if not isinstance(value, dict):
            yield f"{where}: expected object, got {_raw_name(value)}"
            return
        for key, item in value.items():
            yield from _walk(item, info.value_type, _join(path, str(key)))
        return
    if isinstance(info, msgspec.inspect.LiteralType):
        if value not in info.values:
            allowed = ", ".join(repr(v) for v in info.values)
            yield f"{where}: expected one of {allowed}, got {value!r}"
        return
    if isinstance(info, msgspec.inspect.CustomType):
        try:
            _CUSTOM[info.cls](value)
        except ValueError as exc:
            yield f"{where}: {exc}"
        return
    expected = _JSON_NAMES.get(type(info))
    got = _raw_name(value)
    if expected is None:
        return
    if expected == "float" and got == "int":
        return
    if expected != got:
        yield f"{where}: expected {expected}, got {got}"


def _walk_struct(value: object, info: msgspec.inspect.StructType, path: str) -> Iterator[str]:
    where = path or "(top level)"
    if not isinstance(value, dict):
        yield f"{where}: expected object, got {_raw_name(value)}"
        return
    fields = {f.encode_name: f for f in info.fields}
    for key in value:
        if key == info.tag_field:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields))
            yield f"{_join(path, key)}: unknown field (known: {known})"
    for name, field in fields.items():
        if name not in value:
            if field.required:
                yield f"{where}: missing required field `{name}`"
            continue
        yield from _walk(value[name], field.type, _join(path, name))


def _walk_tagged(value: object, structs: list[msgspec.inspect.StructType], path: str) -> Iterator[str]:
    where = path or "(top level)"
    if not isinstance(value, dict):
        yield f"{where}: expected object, got {_raw_name(value)}"
        return
    tag_field = structs[0].tag_field
    tags = {s.tag: s for s in structs}
    tag = value.get(tag_field)
    if tag not in tags:
        allowed = ", ".join(repr(t) for t in tags)
        if tag is None:
            yield f"{where}: missing required field `{tag_field}` (one of {allowed})"
        else:
            yield f"{_join(path, tag_field)}: expected one of {allowed}, got {tag!r}"
        return
    yield from _walk_struct(value, tags[tag], path)


def _semantic_errors(config: Config) -> Iterator[str]:
    """What the types cannot say."""
    binds: dict[tuple[str, int], int] = {}
    for index, listener in enumerate(config.listeners):
        path = f"listeners[{index}]"
        try:
            host, port = parse_hostport(listener.bind)
        except ValueError as exc:
            yield f"{path}.bind: {exc}"
            continue
        if port in {p for (_, p) in binds}:
            first = next(i for (_, p), i in binds.items() if p == port)
            yield f"{path}.bind: port {port} is already used by listeners[{first}]"
        binds[(host, port)] = index
        if listener.token_file is not None and listener.protocol != "kv":
            yield f"{path}.token_file: only kv listeners take a token"
        if listener.protocol == "kv" and not is_loopback(host) and listener.token_file is None:
            yield (f"{path}.bind: a kv listener on {host} (beyond loopback) needs `token_file`; "
                   "bind it to 127.0.0.1 or give it a token")
        if listener.max_connections < 1:
            yield f"{path}.max_connections: must be at least 1, got {listener.max_connections}"
        if listener.max_items < 1:
            yield f"{path}.max_items: must be at least 1, got {listener.max_items}"
        if listener.preauth_frame_size > listener.max_frame_size:
            yield f"{path}.preauth_frame_size: must not exceed max_frame_size ({listener.max_frame_size})"
        if listener.protocol in ("memcached", "cql"):
            if listener.namespace is None:
                yield f"{path}: a {listener.protocol} listener needs `namespace`"
            elif listener.namespace not in config.namespaces:
                yield f"{path}.namespace: unknown namespace {listener.namespace!r}"
        elif listener.namespace is not None and listener.namespace not in config.namespaces:
            yield f"{path}.namespace: unknown namespace {listener.namespace!r}"
        if listener.tls is not None and listener.protocol != "kv":
            yield f"{path}.tls: only a kv listener serves TLS (got {listener.protocol})"
        if listener.protocol == "memcached" and listener.namespace in config.namespaces:
            ns = config.namespaces[listener.namespace]
            if not any(isinstance(t, MemcachedTarget) for t in ns.targets):
                yield f"{path}: namespace {listener.namespace!r} has no memcached target to read from"
        if listener.protocol == "cql" and listener.upstream is None and listener.namespace in config.namespaces:
            ns = config.namespaces[listener.namespace]
            if not any(isinstance(t, CassandraTarget) for t in ns.targets):
                yield f"{path}: set `upstream` or give namespace {listener.namespace!r} a cassandra target"
    yield from _nats_auth_errors(config.sidecar)
    admin_addresses = [("sidecar.admin", config.sidecar.admin)]
    if config.sidecar.admin_token_create and config.sidecar.admin_token_file is None:
        yield "sidecar.admin_token_create: needs sidecar.admin_token_file (where the token is written)"
    if config.sidecar.metrics:
        admin_addresses.append(("sidecar.metrics", config.sidecar.metrics))
    for field, address in admin_addresses:
        try:
            host, port = parse_hostport(address)
        except ValueError as exc:
            yield f"{field}: {exc}"
            continue
        if field == "sidecar.admin" and not is_loopback(host) and config.sidecar.admin_token_file is None:
            yield (f"sidecar.admin: admin on {host} (beyond loopback) needs sidecar.admin_token_file: "
                   "it can pause drains, purge dead letters and read values; bind it to 127.0.0.1 "
                   "(probes and scrapes can use sidecar.metrics) or give it a token")
        clash = next((i for (_, p), i in binds.items() if p == port), None)
        if clash is not None:
            yield f"{field}: port {port} is already used by listeners[{clash}]"

    for name, ns in config.namespaces.items():
        path = f"namespaces.{name}"
        if not NAMESPACE_RE.match(name):
            yield f"{path}: namespace names are lowercase letters, digits, '-' and '_' (<= 63)"
        if not 1 <= ns.partitions <= MAX_PARTITIONS:
            yield f"{path}.partitions: must be between 1 and {MAX_PARTITIONS}, got {ns.partitions}"
        if ns.replicas not in (1, 3, 5):
            yield f"{path}.replicas: must be 1, 3 or 5, got {ns.replicas}"
        if ns.replay_window <= 0:
            yield f"{path}.replay_window: must be positive"
        if ns.duplicate_window <= 0 or ns.duplicate_window > ns.replay_window:
            yield f"{path}.duplicate_window: must be positive and not longer than replay_window"
        if ns.chunk_threshold < 1024:
            yield f"{path}.chunk_threshold: must be at least 1KiB"
        retry = ns.retry
        if retry.multiplier < 1.0:
            yield f"{path}.retry.multiplier: must be >= 1.0, got {retry.multiplier}"
        if retry.initial_delay > retry.max_delay:
            yield f"{path}.retry.initial_delay: must not exceed max_delay ({retry.max_delay})"
        if retry.max_attempts < 1:
            yield f"{path}.retry.max_attempts: must be >= 1, got {retry.max_attempts}"
        seen: dict[str, int] = {}
        for index, target in enumerate(ns.targets):
            tpath = f"{path}.targets[{index}]"
            if target.start != "oldest" and parse_start(target.start) is None:
                yield (f"{tpath}.start: expected \"oldest\" or an RFC3339 time (`walcar ns apply` turns "
                       f"\"now\" into one), got {target.start!r}")
            if not TARGET_NAME_RE.match(target.name):
                yield f"{tpath}.name: target names are lowercase letters, digits, '-' and '_'"
            if target.name in seen:
                yield f"{tpath}.name: duplicate target name {target.name!r} (also targets[{seen[target.name]}])"
            seen.setdefault(target.name, index)
            if isinstance(target, MemcachedTarget):
                if not target.servers:
                    yield f"{tpath}.servers: needs at least one host:port"
                yield from _hostports(target.servers, f"{tpath}.servers")
            elif isinstance(target, CassandraTarget):
                if not target.contact_points:
                    yield f"{tpath}.contact_points: needs at least one host:port"
                yield from _hostports(target.contact_points, f"{tpath}.contact_points")
            elif isinstance(target, WalTarget) and not target.url.startswith(("http://", "https://")):
                yield f"{tpath}.url: expected an http:// or https:// URL, got {target.url!r}"
            check = getattr(target, "check", None)  # targets added later validate themselves
            if check is not None:
                for field, problem in check():
                    yield f"{tpath}.{field}: {problem}"
        if ns.primary is not None and ns.primary not in seen:
            yield f"{path}.primary: no target named {ns.primary!r}"
        if ns.mode == "off" and not ns.targets:
            yield f"{path}.mode: off needs a target to write to"
        if ns.mode == "sync" and not ns.targets:
            yield f"{path}.mode: sync mode needs at least one target to be visible in"


def parse_start(text: str) -> float | None:
    """An RFC3339 time -> unix seconds, or None."""
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp.timestamp() if stamp.tzinfo is not None else None


def _nats_auth_errors(sidecar: SidecarSettings) -> Iterator[str]:
    ways = [name for name, value in (("nats_password_file", sidecar.nats_password_file),
                                     ("nats_token_file", sidecar.nats_token_file),
                                     ("nats_creds", sidecar.nats_creds)) if value]
    if len(ways) > 1:
        yield f"sidecar: set one of {', '.join(ways)}, not several (one way to authenticate to NATS)"
    if (sidecar.nats_user is None) != (sidecar.nats_password_file is None):
        yield "sidecar: nats_user and nats_password_file go together"
    tls = sidecar.nats_tls
    if tls is not None and tls.key_file and not tls.cert_file:
        yield "sidecar.nats_tls.key_file: set cert_file too (the client certificate)"


def _hostports(values: list[str], path: str) -> Iterator[str]:
    for index, value in enumerate(values):
        try:
            parse_hostport(value)
        except ValueError as exc:
            yield f"{path}[{index}]: {exc}"


def parse_document(text: str, fmt: str) -> object:
    """TOML or YAML text -> plain Python objects."""
    if fmt == "toml":
        return tomllib.loads(text)
    if fmt == "yaml":
        return yaml.safe_load(text) or {}
    raise ValueError(f"unknown config format {fmt!r}")


def validate(document: object, source: str = "") -> Config:
    """Plain objects -> Config, or ConfigError listing every problem."""
    errors = list(_walk(document, msgspec.inspect.type_info(Config), ""))
    if errors:
        raise ConfigError(errors, source)
    try:
        config = msgspec.convert(document, Config, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:  # the walker should have caught it; keep the message
        raise ConfigError([str(exc)], source) from None
    semantic = list(_semantic_errors(config))
    if semantic:
        raise ConfigError(semantic, source)
    return config


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError([f"{path}: unknown config format (use .toml, .yaml or .yml)"], str(path))


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"], str(path)) from None
    try:
        document = parse_document(text, format_of(path))
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: not valid {format_of(path).upper()}: {exc}"], str(path)) from None
    return validate(document, str(path))


def to_builtins(config: Config, redact: bool = True) -> dict[str, Any]:
    """The effective config as plain objects (defaults filled in); secrets are files, never values."""
    data = msgspec.to_builtins(config, enc_hook=enc_hook)
    if redact:
        _redact(data)
    return data


_SECRET_KEYS = {"password", "token", "secret"}


def _redact(node: object) -> None:
    """Secret-named keys, and credentials inside any URL (`nats://user:pass@host`), become <redacted>."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, str):
            node[key] = REDACTED if key in _SECRET_KEYS and value else redact_urls(value)  # type: ignore[index]
        else:
            _redact(value)


def dumps(config: Config, fmt: str = "toml") -> str:
    data = to_builtins(config)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return msgspec.toml.encode(drop_none(data)).decode()


def drop_none(node: Any) -> Any:
    """TOML has no null: an unset optional setting is simply absent."""
    if isinstance(node, dict):
        return {k: drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [drop_none(v) for v in node]
    return node


def stream_name(namespace: str) -> str:
    return f"WAL_{namespace.upper()}"
