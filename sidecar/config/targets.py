"""Target settings: where a namespace's journal drains to (memcached, Cassandra, a remote WAL, HTTP, Kafka).

Each target struct carries what the types cannot say about it in `check()`; the
namespace-level checks in sidecar.config.checks call it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import ClassVar, Literal

import msgspec

from sidecar.units import ByteSize, Duration, parse_hostport

TARGET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


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
    # "partition": each journal partition produced in stream order, in long rounds (the fastest; a record
    # that fails holds its partition back); "key": per-key lanes (a failing key holds back only itself).
    ordering: Literal["partition", "key"] = "partition"
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

