"""The arguments of a replay or verify job: one struct for the CLI and the admin API alike.

`POST /v1/replay` decodes its JSON body into `ReplayRequest` (`decode_request`), the
CLI builds the same struct from its options, so both start exactly the same job.
The target is a target of the namespace (`target`, by name) or one given in full
(`target_config`: the config's own target structs, e.g. a freshly restored keyspace
or an empty cache); `as_target` names the namespace target it stands in for, which
decides the entries addressed to it (default: the namespace's target of that type).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from sidecar.config import CassandraTarget, Config, MemcachedTarget, Namespace, Target, WalTarget, dec_hook
from sidecar.replay.filters import FilterError, Filters, build_filters, parse_bound

MAX_BATCH = 10_000


class ReplayError(Exception):
    """The job cannot run as asked (bad argument, unknown target, range out of retention).

    `exit_code` is the CLI's: 2 for anything the operator must change in the command."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class RangeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What both jobs share: the namespace, the target, the range and the exclusions."""

    namespace: str
    target: str | None = None
    target_config: Target | None = None
    as_target: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    exclude_key: list[str] = []
    exclude_seq: list[str] = []
    exclude_op: list[str] = []
    exclude_origin: list[str] = []
    exclude_window: list[str] = []
    batch: int = 500  # journal entries per read and per apply round


class ReplayRequest(RangeRequest, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    dry_run: bool = False
    rate: float = 0.0  # entries applied per second; 0: as fast as the target takes them
    last_value_only: bool = False
    checkpoint: str | None = None  # file; None: the CLI's default path, or none for admin jobs
    resume: bool = False


class VerifyRequest(RangeRequest, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    sample: int = 0  # records to check, chosen at random; 0: every record written in the range
    repair: bool = False


R = TypeVar("R", bound=RangeRequest)


def decode_request(body: bytes, kind: type[R]) -> R:
    """A JSON body (the admin API) -> request; raises ReplayError with msgspec's path to the problem."""
    try:
        return msgspec.json.decode(body, type=kind, dec_hook=dec_hook)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ReplayError(f"invalid request: {exc}") from None


# What only an operator's own command line may give: a target built from scratch (a URL to send the
# journal to, a token file to send with it) and files to write (checkpoints).
LOCAL_ONLY = ("target_config", "as_target", "checkpoint", "resume")


def refuse_local_only(request: RangeRequest) -> None:
    """POST /v1/replay names a target the config holds; anything naming a URL or a file is CLI-only."""
    given = [name for name in LOCAL_ONLY if getattr(request, name, None) not in (None, False)]
    if given:
        raise ReplayError(f"{', '.join(given)}: not accepted over the admin API (a replay there names a configured "
                          "target with `target`); run `walcar replay` for a target or checkpoint of your own")


def namespace_of(config: Config, request: RangeRequest) -> Namespace:
    ns = config.namespaces.get(request.namespace)
    if ns is None:
        known = ", ".join(sorted(config.namespaces)) or "none"
        raise ReplayError(f"unknown namespace {request.namespace!r} (the config has: {known})")
    return ns


def target_settings(config: Config, request: RangeRequest) -> Target:
    """The target a job writes to or checks, with the name its entries are addressed by."""
    ns = namespace_of(config, request)
    names = ", ".join(t.name for t in ns.targets) or "none"
    if request.target is not None and request.target_config is not None:
        raise ReplayError("give either a target of the namespace (--target) or one on the command line, not both")
    if request.target is not None:
        found = ns.target(request.target)
        if found is None:
            raise ReplayError(f"namespace {request.namespace!r} has no target {request.target!r} (it has: {names})")
        return found
    if request.target_config is None:
        raise ReplayError(
            f"name the target: --target NAME (namespace {request.namespace!r} has: {names}), "
            "or --to-memcached HOST:PORT, or --to-cassandra HOST:PORT --keyspace KS"
        )
    given = request.target_config
    name = request.as_target
    if name is None:
        same_type = next((t for t in ns.targets if type(t) is type(given)), None)
        name = same_type.name if same_type is not None else "replay"
    return msgspec.structs.replace(given, name=name)


def check_request(config: Config, request: RangeRequest, now_ns: int) -> Filters:
    """Everything about a request that needs no I/O, so a typo fails before anything connects.

    Returns the parsed exclusions; a resumed replay (its range and target are in the checkpoint) only
    checks the namespace."""
    namespace_of(config, request)
    if getattr(request, "resume", False):
        return Filters()
    target_settings(config, request)
    if not 1 <= request.batch <= MAX_BATCH:
        raise ReplayError(f"--batch must be between 1 and {MAX_BATCH}, got {request.batch}")
    try:
        for flag, text in (("--from", request.from_), ("--to", request.to)):
            if text is not None:
                try:
                    parse_bound(text, now_ns)
                except FilterError as exc:
                    raise FilterError(f"{flag} {exc}") from None
        return build_filters(keys=request.exclude_key, seqs=request.exclude_seq, ops=request.exclude_op,
                             origins=request.exclude_origin, windows=request.exclude_window, now_ns=now_ns)
    except FilterError as exc:
        raise ReplayError(str(exc)) from None


def describe_target(settings: Target) -> str:
    """One line naming where a job writes: for messages, summaries and checkpoint names."""
    if isinstance(settings, MemcachedTarget):
        return f"memcached {','.join(settings.servers)} (as {settings.name})"
    if isinstance(settings, CassandraTarget):
        table = settings.table or "<namespace>"
        return f"cassandra {','.join(settings.contact_points)} {settings.keyspace}.{table} (as {settings.name})"
    if isinstance(settings, WalTarget):
        return f"wal {settings.url} (as {settings.name})"
    return f"{settings.describe()} (as {settings.name})"  # targets added later describe themselves


def to_builtins(request: RangeRequest) -> dict[str, Any]:
    return msgspec.to_builtins(request, enc_hook=str)
