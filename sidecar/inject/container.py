"""The walcar container, its volumes and the env the app containers get: plain dicts, as the API server wants them.

The sidecar reads its per-pod config from a downward-API file projected from the
pod's own `walcar.io/config` annotation (written by the injector). That way the
config reaches pods in any Kubernetes namespace without copying a ConfigMap into each
one; only the NATS credentials (a Secret) must exist in the pod's namespace.
"""

from __future__ import annotations

import math
from typing import Any

from sidecar.inject.annotations import CONFIG, PodOptions
from sidecar.inject.render import NATS_CREDS_DIR, NATS_CREDS_FILE, NATS_TLS_DIR, RUN_DIR
from sidecar.inject.settings import InjectorSettings

CONTAINER_NAME = "walcar"
CONFIG_DIR = "/etc/walcar"
CONFIG_PATH = f"{CONFIG_DIR}/walcar.yaml"
CONFIG_VOLUME = "walcar-config"
NATS_CREDS_VOLUME = "walcar-nats-creds"
RUN_VOLUME = "walcar-run"
NATS_TLS_VOLUME = "walcar-nats-tls"
ADMIN_PORT_NAME = "walcar-admin"  # loopback only; declared so the injector sees an app's clash with it
METRICS_PORT_NAME = "walcar-metrics"
PORT_NAMES = {"kv": "walcar-kv", "memcached": "walcar-memcache", "cql": "walcar-cql"}  # <= 15 characters
APP_ENV = {
    "kv": ("WALCAR_KV_URL", "http://127.0.0.1:{port}"),
    "memcached": ("WALCAR_MEMCACHED_ADDR", "127.0.0.1:{port}"),
    "cql": ("WALCAR_CQL_ADDR", "127.0.0.1:{port}"),
}


def _secret_volume_name(index: int) -> str:
    return f"walcar-secret-{index}"


def volumes(settings: InjectorSettings) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [{
        "name": CONFIG_VOLUME,
        "downwardAPI": {
            "items": [{"path": "walcar.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG}']"}}],
        },
    }, {
        # The admin token the sidecar makes at start: in memory, never on the node's disk.
        "name": RUN_VOLUME,
        "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
    }]
    if settings.nats_creds_secret:
        result.append({
            "name": NATS_CREDS_VOLUME,
            "secret": {
                "secretName": settings.nats_creds_secret,
                "items": [{"key": settings.nats_creds_key, "path": NATS_CREDS_FILE}],
                "defaultMode": 0o444,
            },
        })
    if settings.nats_tls_secret:  # mounted as a directory (never subPath, which kubelet never updates)
        result.append({"name": NATS_TLS_VOLUME, "secret": {"secretName": settings.nats_tls_secret,
                                                           "defaultMode": 0o444}})
    for index, mount in enumerate(settings.secret_mounts):
        result.append({"name": _secret_volume_name(index),
                       "secret": {"secretName": mount.secret, "defaultMode": 0o444}})
    return result


def _mounts(settings: InjectorSettings) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                                    {"name": RUN_VOLUME, "mountPath": RUN_DIR}]
    if settings.nats_creds_secret:
        mounts.append({"name": NATS_CREDS_VOLUME, "mountPath": NATS_CREDS_DIR, "readOnly": True})
    if settings.nats_tls_secret:
        mounts.append({"name": NATS_TLS_VOLUME, "mountPath": NATS_TLS_DIR, "readOnly": True})
    for index, mount in enumerate(settings.secret_mounts):
        mounts.append({"name": _secret_volume_name(index), "mountPath": mount.path, "readOnly": True})
    return mounts


def _resources(settings: InjectorSettings, options: PodOptions) -> dict[str, Any]:
    """Annotations override the defaults: cpu sets the request (and the limit if one is set), memory both."""
    requests = dict(settings.resources.requests)
    limits = dict(settings.resources.limits)
    if options.cpu is not None:
        requests["cpu"] = options.cpu
        if "cpu" in limits:
            limits["cpu"] = options.cpu
    if options.memory is not None:
        requests["memory"] = options.memory
        limits["memory"] = options.memory
    elif options.memory_limit is not None:
        limits["memory"] = options.memory_limit
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def command(settings: InjectorSettings) -> list[str]:
    return ["walcar", "run", "--config", CONFIG_PATH, "--role", settings.role]


def drain_command(settings: InjectorSettings) -> list[str]:
    """The preStop hook: the admin address and its token come from the pod's config."""
    return ["walcar", "drain", "--wait", "--config", CONFIG_PATH]


def wait_ready_command(settings: InjectorSettings) -> list[str]:
    return ["walcar", "inject", "wait-ready", "--url", f"http://127.0.0.1:{settings.ports.admin}/readyz",
            "--timeout", str(math.ceil(settings.startup_timeout))]


def sidecar_container(settings: InjectorSettings, options: PodOptions) -> dict[str, Any]:
    """The walcar container: a native sidecar (restartPolicy Always) or, opted out, a plain first container."""
    ports = [{"name": ADMIN_PORT_NAME, "containerPort": settings.ports.admin, "protocol": "TCP"},
             {"name": METRICS_PORT_NAME, "containerPort": settings.ports.metrics, "protocol": "TCP"}]
    ports += [{"name": PORT_NAMES[p], "containerPort": settings.ports.for_protocol(p), "protocol": "TCP"}
              for p in options.protocols]
    probe_get = {"port": METRICS_PORT_NAME, "scheme": "HTTP"}
    lifecycle: dict[str, Any] = {"preStop": {"exec": {"command": drain_command(settings)}}}
    if not options.native:
        # kubelet starts the next container only once postStart returned: the app finds walcar ready.
        lifecycle["postStart"] = {"exec": {"command": wait_ready_command(settings)}}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command(settings),
        "ports": ports,
        "resources": _resources(settings, options),
        "volumeMounts": _mounts(settings),
        # a native sidecar gates the app's start on this probe, not on readiness
        "startupProbe": {"httpGet": {"path": "/readyz", **probe_get}, "periodSeconds": 1, "timeoutSeconds": 1,
                         "failureThreshold": max(1, math.ceil(settings.startup_timeout))},
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe_get}, "periodSeconds": 2, "timeoutSeconds": 1,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe_get}, "periodSeconds": 10, "timeoutSeconds": 2,
                          "failureThreshold": 3},
        "lifecycle": lifecycle,
        # `kubectl exec ... -c walcar -- walcar status|dlq` finds the admin address and token through it
        "env": [{"name": "WALCAR_CONFIG", "value": CONFIG_PATH}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if options.native:
        container["restartPolicy"] = "Always"
    return container


def app_env(settings: InjectorSettings, options: PodOptions) -> list[dict[str, str]]:
    """Where the app finds walcar, for apps that read it from the environment instead of hard-coding localhost."""
    env = []
    for protocol in options.protocols:
        name, template = APP_ENV[protocol]
        env.append({"name": name, "value": template.format(port=settings.ports.for_protocol(protocol))})
    if options.namespace is not None:
        env.append({"name": "WALCAR_NAMESPACE", "value": options.namespace})
    return env
