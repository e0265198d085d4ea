"""The per-pod walcar config: the control plane plus what this pod asked for.

The control plane (the chart's ConfigMap: `[sidecar]` settings and the namespace
configs) stays the single source of namespace behaviour. The injector adds only the
per-pod part, never namespace settings:

- `listeners`: one per requested protocol, on loopback at the injector's ports, all
  writing to the pod's `walcar.io/namespace` (kv without a namespace serves every
  namespace by path). Listeners in the control plane are replaced.
- `namespaces`: narrowed to the pod's namespace when it names one, so a pod's
  sidecar provisions and drains only what it writes.
- `sidecar`: admin on loopback with a token of the pod's own (made by the sidecar at
  start in a memory volume only the walcar container mounts: the app's containers
  cannot pause or purge anything), the metrics/probe port on the pod IP (kubelet and
  Prometheus), log level, the drain deadline as `shutdown_deadline`, the NATS URL and
  credentials file the injector mounts.

The result is validated with the same rules as `walcar config check`, so a pod whose
annotations cannot work is refused at admission instead of crash-looping later.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import msgspec
import yaml

from sidecar import config as config_mod
from sidecar.inject.annotations import MEMORY, NAMESPACE, PROTOCOLS_KEY, PodOptions, quantity_bytes
from sidecar.inject.settings import InjectorSettings
from sidecar.memory_budget import refusal, worst_case
from sidecar.units import ByteSize

NATS_CREDS_DIR = "/var/run/secrets/walcar/nats"
NATS_CREDS_FILE = "nats.creds"
NATS_TLS_DIR = "/var/run/secrets/walcar/nats-tls"
RUN_DIR = "/var/run/walcar"  # a memory emptyDir of the walcar container alone
ADMIN_TOKEN_FILE = f"{RUN_DIR}/admin.token"
MIB = 1024 * 1024
GRACE_MARGIN_SECONDS = 5  # process start-up of `walcar drain`, the kubelet's own slack


def nats_tls_files(settings: InjectorSettings) -> dict[str, Any]:
    """sidecar.nats_tls pointing into the mounted Secret (the chart's drain Deployment does the same)."""
    tls: dict[str, Any] = {"ca_file": f"{NATS_TLS_DIR}/ca.crt"}
    if settings.nats_tls_client_cert:
        tls.update(cert_file=f"{NATS_TLS_DIR}/tls.crt", key_file=f"{NATS_TLS_DIR}/tls.key")
    if settings.nats_tls_server_name:
        tls["server_name"] = settings.nats_tls_server_name
    if settings.nats_tls_handshake_first:
        tls["handshake_first"] = True
    return tls


class RenderError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def load_control_plane(path: str | Path) -> dict[str, Any]:
    """Read and validate the control plane; ConfigError lists every problem (the injector refuses to start)."""
    config_mod.load(path)  # the same checks as `walcar config check`
    path = Path(path)
    document = config_mod.parse_document(path.read_text(), config_mod.format_of(path))
    if not isinstance(document, dict):  # load() would have said so; keep the type honest
        raise config_mod.ConfigError([f"{path}: expected a mapping at the top level"], str(path))
    return document


def _listener_name(listener: dict[str, Any]) -> str:
    return f"{listener['protocol']} listener"


def _explain(errors: list[str], listeners: list[dict[str, Any]]) -> list[str]:
    """`listeners[0]: ...` means nothing to the pod's author: name the protocol they asked for."""
    explained = []
    for error in errors:
        for index, listener in enumerate(listeners):
            prefix = f"listeners[{index}]"
            if error.startswith(prefix):
                error = f"{PROTOCOLS_KEY} ({_listener_name(listener)}){error[len(prefix):]}"
                break
        explained.append(error)
    return explained


def pod_config(control_plane: dict[str, Any], settings: InjectorSettings,
               options: PodOptions) -> tuple[dict[str, Any], config_mod.Config]:
    """The document the pod's sidecar will load (and its parsed form), or RenderError saying why it cannot."""
    document = copy.deepcopy(control_plane)
    namespaces: dict[str, Any] = document.get("namespaces") or {}
    if options.namespace is not None:
        if options.namespace not in namespaces:
            known = ", ".join(sorted(namespaces)) or "none"
            raise RenderError([f"{NAMESPACE}: unknown namespace {options.namespace!r} "
                               f"(the walcar control plane has: {known})"])
        document["namespaces"] = {options.namespace: namespaces[options.namespace]}

    sidecar = dict(document.get("sidecar") or {})
    if settings.nats_url:
        sidecar["nats_url"] = settings.nats_url
    if settings.nats_creds_secret:
        sidecar["nats_creds"] = f"{NATS_CREDS_DIR}/{NATS_CREDS_FILE}"
    if settings.nats_tls_secret:
        sidecar["nats_tls"] = nats_tls_files(settings)
    sidecar["admin"] = f"127.0.0.1:{settings.ports.admin}"
    sidecar["admin_token_file"] = ADMIN_TOKEN_FILE
    sidecar["admin_token_create"] = True
    sidecar["metrics"] = f"0.0.0.0:{settings.ports.metrics}"
    sidecar["log_level"] = options.log_level
    sidecar["shutdown_deadline"] = str(settings.drain_deadline)
    document["sidecar"] = sidecar

    listeners = []
    for protocol in options.protocols:
        listener: dict[str, Any] = {"protocol": protocol, "bind": f"127.0.0.1:{settings.ports.for_protocol(protocol)}"}
        if options.namespace is not None:
            listener["namespace"] = options.namespace
        listeners.append(listener)
    document["listeners"] = listeners

    try:
        parsed = config_mod.validate(document)
    except config_mod.ConfigError as exc:
        raise RenderError(_explain(exc.errors, listeners)) from None
    return document, parsed


def sized_memory(parsed: config_mod.Config, settings: InjectorSettings, options: PodOptions) -> PodOptions:
    """The pod's options with a memory limit its sidecar's budgets fit in: a default limit is raised
    to the worst case (rounded up to MiB); a `walcar.io/memory` below it is refused (RenderError)
    at admission, rather than the sidecar refusing to start in a crash loop."""
    limit = quantity_bytes(options.memory or settings.resources.limits.get("memory", ""))
    if limit is None:
        return options
    if options.memory is not None:
        problem = refusal(msgspec.structs.replace(parsed, sidecar=msgspec.structs.replace(
            parsed.sidecar, memory_limit=ByteSize(limit))), settings.role)
        if problem is not None:
            raise RenderError([f"{MEMORY}: {problem}"])
        return options
    needed = sum(size for _, size in worst_case(parsed, settings.role))
    if needed <= limit:
        return options
    return dataclasses.replace(options, memory_limit=f"{-(-needed // MIB)}Mi")


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def required_grace_seconds(cfg: config_mod.Config) -> int:
    """The pod's terminationGracePeriodSeconds must cover the sidecar's grace + deadline."""
    return math.ceil(cfg.sidecar.shutdown_grace + cfg.sidecar.shutdown_deadline) + GRACE_MARGIN_SECONDS
