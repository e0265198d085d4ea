"""The injector's own settings: what it injects and how it serves (a small YAML file).

These are cluster-wide defaults chosen by whoever installs the chart; per-pod
annotations (sidecar/inject/annotations.py) refine some of them. The namespace
configs themselves are not here: they are the control plane file (`control_plane`),
the chart's ConfigMap, which the injector reads once at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec
import yaml

from sidecar import __version__
from sidecar.units import Duration, parse_hostport

Protocol = Literal["memcached", "cql", "kv"]
LogLevel = Literal["debug", "info", "warning", "error"]
PROTOCOLS: tuple[str, ...] = ("memcached", "cql", "kv")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Ports(_Base):
    """Where the injected sidecar listens: data listeners and admin on loopback; `metrics` (/metrics,
    /healthz, /readyz: no values, no mutations) on the pod IP for kubelet's probes and Prometheus."""

    admin: int = 9901
    metrics: int = 9902
    kv: int = 8080
    memcached: int = 11211
    cql: int = 9042

    def for_protocol(self, protocol: str) -> int:
        return int(getattr(self, protocol))


class Resources(_Base):
    requests: dict[str, str] = msgspec.field(default_factory=lambda: {"cpu": "100m", "memory": "128Mi"})
    limits: dict[str, str] = msgspec.field(default_factory=lambda: {"memory": "256Mi"})


class SecretMount(_Base):
    """A Secret the targets' `password_file`/`token_file` point into; it must exist in the pod's namespace."""

    secret: str
    path: str


class InjectorSettings(_Base):
    # serving
    bind: str = "0.0.0.0:8443"
    cert_file: str | None = None
    key_file: str | None = None
    cert_reload_interval: Duration = Duration(60.0)
    # what to inject
    control_plane: str = "/etc/walcar/walcar.yaml"
    image: str = f"ghcr.io/walcar/walcar:{__version__}"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    nats_url: str | None = None  # overrides the control plane's sidecar.nats_url when set
    nats_creds_secret: str | None = None  # Secret (in the pod's namespace) holding the NATS credentials file
    nats_creds_key: str = "nats.creds"
    # Secret (in the pod's namespace) with the NATS TLS files, cert-manager's layout: ca.crt, and
    # tls.crt + tls.key when nats_tls_client_cert (mTLS). Mounted whole, so a rotation reaches the pod.
    nats_tls_secret: str | None = None
    nats_tls_client_cert: bool = True
    nats_tls_server_name: str | None = None
    nats_tls_handshake_first: bool = False
    role: Literal["all", "ingress"] = "all"  # "ingress" when a drain-only Deployment applies the journal
    native_sidecar: bool = True  # false for clusters older than 1.29 (pods may still opt out per pod)
    drain_deadline: Duration = Duration(30.0)
    startup_timeout: Duration = Duration(120.0)  # how long the app waits for the sidecar's /readyz
    protocols: list[Protocol] = msgspec.field(default_factory=lambda: ["kv"])
    log_level: LogLevel = "info"
    ports: Ports = msgspec.field(default_factory=Ports)
    resources: Resources = msgspec.field(default_factory=Resources)
    secret_mounts: list[SecretMount] = msgspec.field(default_factory=list)
    run_as_user: int = 10001
    # what an unexpected error in the injector answers: mirror the webhook's failurePolicy
    failure_policy: Literal["Fail", "Ignore"] = "Fail"


class SettingsError(Exception):
    pass


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Duration:
        return Duration.parse(obj)
    raise NotImplementedError(tp)


def _check(settings: InjectorSettings) -> list[str]:
    """What the types cannot say."""
    errors = []
    try:
        parse_hostport(settings.bind)
    except ValueError as exc:
        errors.append(f"bind: {exc}")
    if (settings.cert_file is None) != (settings.key_file is None):
        errors.append("cert_file and key_file go together")
    ports = msgspec.structs.asdict(settings.ports)
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            errors.append(f"ports.{name}: must be between 1 and 65535, got {port}")
    if len(set(ports.values())) != len(ports):
        errors.append(f"ports: every port must differ, got {ports}")
    if not settings.image:
        errors.append("image: must not be empty")
    if settings.drain_deadline <= 0:
        errors.append("drain_deadline: must be positive")
    return errors


def parse(document: object, source: str = "") -> InjectorSettings:
    """Plain objects -> settings, or SettingsError naming the problem."""
    where = f"{source}: " if source else ""
    try:
        settings = msgspec.convert(document or {}, InjectorSettings, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}{exc}") from None
    errors = _check(settings)
    if errors:
        raise SettingsError(where + "; ".join(errors))
    return settings


def load(path: str | Path) -> InjectorSettings:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    return parse(document, str(path))
