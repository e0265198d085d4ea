"""The control plane: the sidecar's settings, its listeners and its namespaces.

A config file (TOML or YAML) is decoded into these msgspec structs. Loading never
stops at the first mistake: `validate` walks the raw document against the struct
types and collects every error with its path (``namespaces.a.targets[0].servers:
expected array, got str``), then checks what types cannot say (ports used twice,
listeners naming unknown namespaces, ...). `walcar config check` prints them all.

Modules, one concern each: targets (target structs), model (namespaces, listeners,
sidecar settings, Config), schema (decoding and the error walk), checks (the
cross-field rules), files (files in, documents out). Import names from here.
"""

from sidecar.config.checks import parse_start, semantic_errors
from sidecar.config.files import (
    drop_none,
    dumps,
    format_of,
    load,
    parse_document,
    to_builtins,
    validate,
)
from sidecar.config.model import (
    MAX_PARTITIONS,
    NAMESPACE_RE,
    Config,
    ConfigError,
    DrainSettings,
    JournalSettings,
    Listener,
    ListenerTls,
    Namespace,
    NatsTls,
    SidecarSettings,
    stream_name,
)
from sidecar.config.schema import dec_hook, enc_hook
from sidecar.config.targets import (
    DEFAULT_MAX_ITEM_SIZE,
    MEMCACHED_ITEM_SIZE,
    TARGET_NAME_RE,
    CassandraTarget,
    CassandraTls,
    HttpTarget,
    KafkaTarget,
    MemcachedTarget,
    RetryPolicy,
    Target,
    WalTarget,
    WalTls,
)

__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "MAX_PARTITIONS",
    "MEMCACHED_ITEM_SIZE",
    "NAMESPACE_RE",
    "TARGET_NAME_RE",
    "CassandraTarget",
    "CassandraTls",
    "Config",
    "ConfigError",
    "DrainSettings",
    "HttpTarget",
    "JournalSettings",
    "KafkaTarget",
    "Listener",
    "ListenerTls",
    "MemcachedTarget",
    "Namespace",
    "NatsTls",
    "RetryPolicy",
    "SidecarSettings",
    "Target",
    "WalTarget",
    "WalTls",
    "dec_hook",
    "drop_none",
    "dumps",
    "enc_hook",
    "format_of",
    "load",
    "parse_document",
    "parse_start",
    "semantic_errors",
    "stream_name",
    "to_builtins",
    "validate",
]
