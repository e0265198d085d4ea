"""What the types cannot say: ports used twice, listeners naming unknown namespaces, unsafe binds, ...

`semantic_errors` runs after the document decoded; each check below yields one
message per problem, prefixed with the path of the setting to change.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sidecar.config.model import MAX_PARTITIONS, NAMESPACE_RE, Config, Listener, Namespace, SidecarSettings
from sidecar.config.targets import TARGET_NAME_RE, CassandraTarget, MemcachedTarget, RetryPolicy, Target, WalTarget
from sidecar.envelope import MAX_PACK_ENTRIES
from sidecar.secrets import is_loopback
from sidecar.units import parse_hostport

# (host, port) of each listener -> its index in config.listeners
Binds = dict[tuple[str, int], int]


def semantic_errors(config: Config) -> Iterator[str]:
    binds: Binds = {}
    for index, listener in enumerate(config.listeners):
        yield from _listener_errors(config, listener, index, binds)
    yield from _nats_auth_errors(config.sidecar)
    if not 1 <= config.sidecar.journal.pack_entries <= MAX_PACK_ENTRIES:
        yield f"sidecar.journal.pack_entries: must be between 1 and {MAX_PACK_ENTRIES}, got " \
              f"{config.sidecar.journal.pack_entries}"
    yield from _admin_errors(config.sidecar, binds)
    for name, ns in config.namespaces.items():
        yield from _namespace_errors(name, ns)


def _port_owner(binds: Binds, port: int) -> int | None:
    return next((i for (_, p), i in binds.items() if p == port), None)


def _listener_errors(config: Config, listener: Listener, index: int, binds: Binds) -> Iterator[str]:
    path = f"listeners[{index}]"
    try:
        host, port = parse_hostport(listener.bind)
    except ValueError as exc:
        yield f"{path}.bind: {exc}"
        return
    first = _port_owner(binds, port)
    if first is not None:
        yield f"{path}.bind: port {port} is already used by listeners[{first}]"
    binds[(host, port)] = index
    if listener.token_file is not None and listener.protocol != "kv":
        yield f"{path}.token_file: only kv listeners take a token"
    if listener.protocol == "kv" and not is_loopback(host) and listener.token_file is None:
        yield (f"{path}.bind: a kv listener on {host} (beyond loopback) needs `token_file`; "
               "bind it to 127.0.0.1 or give it a token")
    yield from _listener_limit_errors(listener, path)
    yield from _listener_namespace_errors(config, listener, path)
    if listener.tls is not None and listener.protocol != "kv":
        yield f"{path}.tls: only a kv listener serves TLS (got {listener.protocol})"
    yield from _listener_target_errors(config, listener, path)


def _listener_limit_errors(listener: Listener, path: str) -> Iterator[str]:
    if listener.max_connections < 1:
        yield f"{path}.max_connections: must be at least 1, got {listener.max_connections}"
    if listener.max_items < 1:
        yield f"{path}.max_items: must be at least 1, got {listener.max_items}"
    if listener.preauth_frame_size > listener.max_frame_size:
        yield f"{path}.preauth_frame_size: must not exceed max_frame_size ({listener.max_frame_size})"
    if listener.protocol == "kv" and 2 * int(listener.max_body) > int(listener.partial_budget):
        # A decoded body holds itself and its values: one request of max_body must fit the budget.
        yield (f"{path}.max_body: a body of {int(listener.max_body)} bytes holds twice that once decoded, over "
               f"partial_budget ({int(listener.partial_budget)}): raise partial_budget or lower max_body")


def _listener_namespace_errors(config: Config, listener: Listener, path: str) -> Iterator[str]:
    if listener.namespace is None:
        if listener.protocol in ("memcached", "cql"):
            yield f"{path}: a {listener.protocol} listener needs `namespace`"
    elif listener.namespace not in config.namespaces:
        yield f"{path}.namespace: unknown namespace {listener.namespace!r}"


def _listener_target_errors(config: Config, listener: Listener, path: str) -> Iterator[str]:
    """A memcached front reads from its namespace's memcached target; a cql front from Cassandra."""
    ns = config.namespaces.get(listener.namespace) if listener.namespace is not None else None
    if ns is None:
        return
    if listener.protocol == "memcached" and not any(isinstance(t, MemcachedTarget) for t in ns.targets):
        yield f"{path}: namespace {listener.namespace!r} has no memcached target to read from"
    if (listener.protocol == "cql" and listener.upstream is None
            and not any(isinstance(t, CassandraTarget) for t in ns.targets)):
        yield f"{path}: set `upstream` or give namespace {listener.namespace!r} a cassandra target"


def _admin_errors(sidecar: SidecarSettings, binds: Binds) -> Iterator[str]:
    if sidecar.admin_token_create and sidecar.admin_token_file is None:
        yield "sidecar.admin_token_create: needs sidecar.admin_token_file (where the token is written)"
    addresses = [("sidecar.admin", sidecar.admin)]
    if sidecar.metrics:
        addresses.append(("sidecar.metrics", sidecar.metrics))
    for field, address in addresses:
        try:
            host, port = parse_hostport(address)
        except ValueError as exc:
            yield f"{field}: {exc}"
            continue
        if field == "sidecar.admin" and not is_loopback(host) and sidecar.admin_token_file is None:
            yield (f"sidecar.admin: admin on {host} (beyond loopback) needs sidecar.admin_token_file: "
                   "it can pause drains, purge dead letters and read values; bind it to 127.0.0.1 "
                   "(probes and scrapes can use sidecar.metrics) or give it a token")
        clash = _port_owner(binds, port)
        if clash is not None:
            yield f"{field}: port {port} is already used by listeners[{clash}]"


def _namespace_errors(name: str, ns: Namespace) -> Iterator[str]:
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
    yield from _retry_errors(ns.retry, f"{path}.retry")
    seen: dict[str, int] = {}
    for index, target in enumerate(ns.targets):
        yield from _target_errors(target, f"{path}.targets[{index}]", seen)
        seen.setdefault(target.name, index)
    if ns.primary is not None and ns.primary not in seen:
        yield f"{path}.primary: no target named {ns.primary!r}"
    if ns.mode == "off" and not ns.targets:
        yield f"{path}.mode: off needs a target to write to"
    if ns.mode == "sync" and not ns.targets:
        yield f"{path}.mode: sync mode needs at least one target to be visible in"


def _retry_errors(retry: RetryPolicy, path: str) -> Iterator[str]:
    if retry.multiplier < 1.0:
        yield f"{path}.multiplier: must be >= 1.0, got {retry.multiplier}"
    if retry.initial_delay > retry.max_delay:
        yield f"{path}.initial_delay: must not exceed max_delay ({retry.max_delay})"
    if retry.max_attempts < 1:
        yield f"{path}.max_attempts: must be >= 1, got {retry.max_attempts}"


def _target_errors(target: Target, tpath: str, seen: dict[str, int]) -> Iterator[str]:
    """`seen`: target names of the namespace before this one -> their index."""
    if target.start != "oldest" and parse_start(target.start) is None:
        yield (f"{tpath}.start: expected \"oldest\" or an RFC3339 time (`walcar ns apply` turns "
               f"\"now\" into one), got {target.start!r}")
    if not TARGET_NAME_RE.match(target.name):
        yield f"{tpath}.name: target names are lowercase letters, digits, '-' and '_'"
    if target.name in seen:
        yield f"{tpath}.name: duplicate target name {target.name!r} (also targets[{seen[target.name]}])"
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

