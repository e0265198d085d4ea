"""The injector's admission decision: AdmissionReview fixtures shaped like the API server's, patch applied.

The fixtures at the top (pods as the API server hands them to a mutating webhook:
defaulted, with the service-account token volume and a generateName) are shared with
tests/integration/test_injector_tls.py and the start-a-sidecar test.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import threading
import time
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import cli
from sidecar import config as config_mod
from sidecar.inject import render
from sidecar.inject.patch import Injector
from sidecar.inject.settings import SettingsError, parse

CONTROL_PLANE: dict[str, Any] = {
    "sidecar": {"region": "eu-west-1", "nats_url": "nats://from-configmap:4222", "shutdown_grace": "2s"},
    "namespaces": {
        "orders": {"mode": "async", "partitions": 8},
        "sessions": {"targets": [{"name": "cache", "type": "memcached", "servers": ["memcached.cache:11211"]}]},
        "playback": {"targets": [{"name": "cass", "type": "cassandra", "contact_points": ["cassandra.db:9042"],
                                  "keyspace": "playback"}]},
    },
}

SETTINGS: dict[str, Any] = {
    "image": "registry.example/walcar:1.2.3",
    "nats_url": "nats://nats.nats.svc:4222",
    "nats_creds_secret": "walcar-nats",
    "drain_deadline": "30s",
}


def deployment_pod(annotations: dict[str, str] | None = None, **spec_overrides: Any) -> dict[str, Any]:
    """A pod as created by a Deployment's ReplicaSet, after defaulting and the ServiceAccount plugin."""
    spec: dict[str, Any] = {
        "volumes": [{
            "name": "kube-api-access-7xk2p",
            "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ]},
        }],
        "containers": [{
            "name": "web",
            "image": "registry.example/shop-web:4.1",
            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
            "env": [{"name": "LOG_FORMAT", "value": "json"}],
            "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
            "volumeMounts": [{"name": "kube-api-access-7xk2p", "readOnly": True,
                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        }],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300},
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    spec.update(spec_overrides)
    metadata: dict[str, Any] = {
        "generateName": "web-7c9f8d6b5d-",
        "namespace": "shop",
        "creationTimestamp": None,
        "labels": {"app": "web", "pod-template-hash": "7c9f8d6b5d"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9f8d6b5d",
                             "uid": "3f0e9c1a-8d3b-4a51-9f39-0c1d6f8e2b11", "controller": True,
                             "blockOwnerDeletion": True}],
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": spec, "status": {}}


def admission_review(pod: Any, *, uid: str = "b7c5e6a2-2f0d-4b8e-9d1f-5a7c3e9b0d42", operation: str = "CREATE",
                     kind: str = "Pod") -> dict[str, Any]:
    resource = "pods" if kind == "Pod" else kind.lower() + "s"
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "5d2b0a8e-0c3f-4e7b-8a6d-1f9e2c4b7a30",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def body(review: Any) -> bytes:
    return json.dumps(review).encode()


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    assert answer["response"].get("patchType") == "JSONPatch"
    return json.loads(base64.b64decode(answer["response"]["patch"]))


def apply(pod: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    return jsonpatch.apply_patch(copy.deepcopy(pod), patch_of(answer))


def walcar_of(pod: dict[str, Any]) -> dict[str, Any]:
    every = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    return next(c for c in every if c["name"] == "walcar")


def injector(**overrides: Any) -> Injector:
    return Injector(parse({**SETTINGS, **overrides}), copy.deepcopy(CONTROL_PLANE))


def answer_for(pod: Any, inj: Injector | None = None, **review_kwargs: Any) -> dict[str, Any]:
    status, answer, _ = (inj or injector()).handle(body(admission_review(pod, **review_kwargs)))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    return answer


def pod_config_of(pod: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(pod["metadata"]["annotations"]["walcar.io/config"])


def denial(answer: dict[str, Any]) -> str:
    response = answer["response"]
    assert response["allowed"] is False, response
    assert "patch" not in response
    assert response["status"]["code"] == 400
    return response["status"]["message"]


# --- a Deployment's pod gets a native sidecar ---------------------------------------------


def test_deployment_pod_gets_a_native_sidecar_before_the_app() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "orders"})
    answer = answer_for(pod, uid="uid-1")
    assert answer["response"]["uid"] == "uid-1"
    assert answer["response"]["allowed"] is True
    out = apply(pod, answer)

    walcar = out["spec"]["initContainers"][0]
    assert walcar["name"] == "walcar"
    assert walcar["restartPolicy"] == "Always"  # native sidecar: starts before, stops after the app
    assert walcar["image"] == "registry.example/walcar:1.2.3"
    assert walcar["command"] == ["walcar", "run", "--config", "/etc/walcar/walcar.yaml", "--role", "all"]
    assert [c["name"] for c in out["spec"]["containers"]] == ["web"]
    assert "postStart" not in walcar["lifecycle"]
    # the app container is untouched except for where to find walcar
    web = out["spec"]["containers"][0]
    assert web["ports"] == pod["spec"]["containers"][0]["ports"]
    assert web["env"] == [{"name": "LOG_FORMAT", "value": "json"},
                          {"name": "WALCAR_KV_URL", "value": "http://127.0.0.1:8080"},
                          {"name": "WALCAR_NAMESPACE", "value": "orders"}]
    assert out["metadata"]["labels"]["walcar.io/injected"] == "true"
    assert out["metadata"]["generateName"] == "web-7c9f8d6b5d-"


def test_probes_ports_and_drain_hook() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    walcar = walcar_of(apply(pod, answer_for(pod)))
    assert walcar["ports"] == [
        {"name": "walcar-admin", "containerPort": 9901, "protocol": "TCP"},
        {"name": "walcar-metrics", "containerPort": 9902, "protocol": "TCP"},
        {"name": "walcar-kv", "containerPort": 8080, "protocol": "TCP"},
    ]
    # kubelet probes the open port (no values, no mutations); admin stays on loopback
    assert walcar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "walcar-metrics", "scheme": "HTTP"}
    assert walcar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "walcar-metrics", "scheme": "HTTP"}
    # the startup probe is what holds the app's start until walcar is ready
    assert walcar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert walcar["startupProbe"]["periodSeconds"] * walcar["startupProbe"]["failureThreshold"] >= 120
    # the hook finds the admin address and the pod's token through the config
    assert walcar["lifecycle"]["preStop"] == {
        "exec": {"command": ["walcar", "drain", "--wait", "--config", "/etc/walcar/walcar.yaml"]}}
    assert walcar["securityContext"]["runAsNonRoot"] is True
    assert walcar["securityContext"]["readOnlyRootFilesystem"] is True


def test_config_comes_from_the_control_plane_with_per_pod_listeners() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "sessions",
                          "walcar.io/protocols": "memcached, kv", "walcar.io/log-level": "debug"})
    out = apply(pod, answer_for(pod))
    assert out["metadata"]["annotations"]["walcar.io/status"] == "injected"
    document = pod_config_of(out)
    config_mod.validate(document)  # what `walcar config check` accepts
    assert document["listeners"] == [
        {"protocol": "memcached", "bind": "127.0.0.1:11211", "namespace": "sessions"},
        {"protocol": "kv", "bind": "127.0.0.1:8080", "namespace": "sessions"},
    ]
    # only the pod's namespace, exactly as the control plane defines it
    assert document["namespaces"] == {"sessions": CONTROL_PLANE["namespaces"]["sessions"]}
    sidecar = document["sidecar"]
    assert sidecar["region"] == "eu-west-1"
    assert sidecar["nats_url"] == "nats://nats.nats.svc:4222"  # the injector's setting wins
    assert sidecar["nats_creds"] == "/var/run/secrets/walcar/nats/nats.creds"
    assert sidecar["admin"] == "127.0.0.1:9901"  # nothing outside the pod reaches admin
    assert sidecar["metrics"] == "0.0.0.0:9902"  # kubelet probes and Prometheus scrapes this one
    # a token of the pod's own, made at start in a volume only the walcar container mounts
    assert sidecar["admin_token_file"] == "/var/run/walcar/admin.token"
    assert sidecar["admin_token_create"] is True
    assert sidecar["log_level"] == "debug"
    assert sidecar["shutdown_deadline"] == "30s"


def test_config_and_credentials_are_mounted() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    out = apply(pod, answer_for(pod))
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert "kube-api-access-7xk2p" in volumes
    assert volumes["walcar-config"]["downwardAPI"]["items"] == [
        {"path": "walcar.yaml", "fieldRef": {"fieldPath": "metadata.annotations['walcar.io/config']"}},
    ]
    assert volumes["walcar-nats-creds"]["secret"]["secretName"] == "walcar-nats"
    assert volumes["walcar-nats-creds"]["secret"]["items"] == [{"key": "nats.creds", "path": "nats.creds"}]
    mounts = {m["mountPath"]: m["name"] for m in walcar_of(out)["volumeMounts"]}
    assert mounts == {"/etc/walcar": "walcar-config", "/var/run/secrets/walcar/nats": "walcar-nats-creds",
                      "/var/run/walcar": "walcar-run"}
    assert volumes["walcar-run"] == {"name": "walcar-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    app_mounts = [m["mountPath"] for c in out["spec"]["containers"] if c["name"] != "walcar"
                  for m in c.get("volumeMounts", [])]
    assert "/var/run/walcar" not in app_mounts  # the app's containers never see the admin token
    # without kv there is no namespace-less default: every namespace of the control plane is served
    assert set(pod_config_of(out)["namespaces"]) == {"orders", "sessions", "playback"}


def test_without_a_credentials_secret_nothing_is_mounted_for_nats() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    out = apply(pod, answer_for(pod, injector(nats_creds_secret=None)))
    assert [v["name"] for v in out["spec"]["volumes"]] == ["kube-api-access-7xk2p", "walcar-config", "walcar-run"]
    assert "nats_creds" not in pod_config_of(out)["sidecar"]


def test_nats_tls_secret_is_mounted_whole_and_named_in_the_config() -> None:
    """cert-manager's Secret layout (ca.crt, tls.crt, tls.key), mounted as a directory so a rotation
    reaches the pod and the sidecar re-reads it at its next reconnect."""
    pod = deployment_pod({"walcar.io/inject": "true"})
    out = apply(pod, answer_for(pod, injector(nats_tls_secret="walcar-nats-tls", nats_tls_server_name="nats.svc")))
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["walcar-nats-tls"]["secret"] == {"secretName": "walcar-nats-tls", "defaultMode": 0o444}
    mounts = {m["mountPath"]: m for m in walcar_of(out)["volumeMounts"]}
    assert mounts["/var/run/secrets/walcar/nats-tls"] == {"name": "walcar-nats-tls", "readOnly": True,
                                                          "mountPath": "/var/run/secrets/walcar/nats-tls"}
    assert pod_config_of(out)["sidecar"]["nats_tls"] == {
        "ca_file": "/var/run/secrets/walcar/nats-tls/ca.crt", "cert_file": "/var/run/secrets/walcar/nats-tls/tls.crt",
        "key_file": "/var/run/secrets/walcar/nats-tls/tls.key", "server_name": "nats.svc"}
    ca_only = apply(pod, answer_for(pod, injector(nats_tls_secret="nats-ca", nats_tls_client_cert=False)))
    assert pod_config_of(ca_only)["sidecar"]["nats_tls"] == {"ca_file": "/var/run/secrets/walcar/nats-tls/ca.crt"}


def test_secret_mounts_for_target_passwords() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    inj = injector(secret_mounts=[{"secret": "cassandra-password", "path": "/var/run/secrets/walcar/cassandra"}])
    out = apply(pod, answer_for(pod, inj))
    assert {"name": "walcar-secret-0", "secret": {"secretName": "cassandra-password", "defaultMode": 0o444}} \
        in out["spec"]["volumes"]
    assert {"name": "walcar-secret-0", "mountPath": "/var/run/secrets/walcar/cassandra", "readOnly": True} \
        in walcar_of(out)["volumeMounts"]


def test_existing_init_containers_run_after_walcar() -> None:
    migrate = {"name": "migrate", "image": "registry.example/shop-migrate:4.1", "command": ["migrate", "up"]}
    fetch = {"name": "fetch-assets", "image": "busybox:1.36"}
    pod = deployment_pod({"walcar.io/inject": "true"}, initContainers=[migrate, fetch])
    out = apply(pod, answer_for(pod))
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["walcar", "migrate", "fetch-assets"]
    assert out["spec"]["initContainers"][1] == migrate


def test_native_sidecar_opt_out_makes_walcar_the_first_container_with_a_ready_wait() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/native-sidecar": "false"})
    out = apply(pod, answer_for(pod))
    assert "initContainers" not in out["spec"]
    assert [c["name"] for c in out["spec"]["containers"]] == ["walcar", "web"]
    walcar = out["spec"]["containers"][0]
    assert "restartPolicy" not in walcar
    assert walcar["lifecycle"]["postStart"]["exec"]["command"] == [
        "walcar", "inject", "wait-ready", "--url", "http://127.0.0.1:9901/readyz", "--timeout", "120"]
    assert walcar["lifecycle"]["preStop"]["exec"]["command"][:3] == ["walcar", "drain", "--wait"]
    # the env went to the app container, not to walcar
    assert any(e["name"] == "WALCAR_KV_URL" for e in out["spec"]["containers"][1]["env"])


def test_cluster_wide_native_off_and_per_pod_opt_back_in() -> None:
    inj = injector(native_sidecar=False)
    pod = deployment_pod({"walcar.io/inject": "true"})
    assert apply(pod, answer_for(pod, inj))["spec"]["containers"][0]["name"] == "walcar"
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/native-sidecar": "true"})
    assert apply(pod, answer_for(pod, inj))["spec"]["initContainers"][0]["name"] == "walcar"


def test_all_protocols_listen_on_loopback_and_are_declared() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "playback",
                          "walcar.io/protocols": "cql,kv"})
    out = apply(pod, answer_for(pod))
    assert [(p["name"], p["containerPort"]) for p in walcar_of(out)["ports"]] == [
        ("walcar-admin", 9901), ("walcar-metrics", 9902), ("walcar-cql", 9042), ("walcar-kv", 8080)]
    assert [listener["bind"] for listener in pod_config_of(out)["listeners"]] == ["127.0.0.1:9042", "127.0.0.1:8080"]
    env = {e["name"]: e["value"] for e in out["spec"]["containers"][0]["env"]}
    assert env["WALCAR_CQL_ADDR"] == "127.0.0.1:9042"


def test_resources_from_annotations_override_the_defaults() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/cpu": "500m", "walcar.io/memory": "1Gi"})
    walcar = walcar_of(apply(pod, answer_for(pod)))
    assert walcar["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    plain = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "playback"})
    default = walcar_of(apply(plain, answer_for(plain)))
    assert default["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}


def test_the_default_memory_limit_grows_to_what_the_sidecars_budgets_can_hold() -> None:
    """One listener and one namespace fit the chart's 256Mi; another listener's budgets raise the
    default limit (so do namespaces: a kv listener without one serves, and overlays, them all)."""
    one = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "playback"})
    assert walcar_of(apply(one, answer_for(one)))["resources"]["limits"] == {"memory": "256Mi"}
    two = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "playback",
                          "walcar.io/protocols": "cql,kv"})
    limits = walcar_of(apply(two, answer_for(two)))["resources"]["limits"]
    assert int(limits["memory"].removesuffix("Mi")) > 256, limits


def test_a_memory_annotation_below_the_sidecars_worst_case_is_refused() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/memory": "128Mi"})
    message = denial(answer_for(pod))
    assert "walcar.io/memory" in message and "worst-case memory" in message, message


def test_cpu_annotation_moves_a_configured_cpu_limit_too() -> None:
    inj = injector(resources={"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}})
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/cpu": "1"})
    assert walcar_of(apply(pod, answer_for(pod, inj)))["resources"] == {
        "requests": {"cpu": "1"}, "limits": {"cpu": "1"}}


def test_short_grace_period_is_raised_to_cover_the_drain() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"}, terminationGracePeriodSeconds=10)
    out = apply(pod, answer_for(pod))
    # shutdown_grace 2s + drain deadline 30s + margin
    assert out["spec"]["terminationGracePeriodSeconds"] == 37


def test_default_grace_period_is_raised_when_the_pod_sets_none() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    del pod["spec"]["terminationGracePeriodSeconds"]
    assert apply(pod, answer_for(pod))["spec"]["terminationGracePeriodSeconds"] == 37


def test_long_grace_period_is_never_lowered() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"}, terminationGracePeriodSeconds=120)
    answer = answer_for(pod)
    assert not any(op["path"] == "/spec/terminationGracePeriodSeconds" for op in patch_of(answer))
    assert apply(pod, answer)["spec"]["terminationGracePeriodSeconds"] == 120


def test_longer_drain_deadline_raises_grace_further() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    out = apply(pod, answer_for(pod, injector(drain_deadline="2m")))
    assert out["spec"]["terminationGracePeriodSeconds"] == 127
    assert pod_config_of(out)["sidecar"]["shutdown_deadline"] == "2m"


def test_role_ingress_when_a_drain_deployment_applies_the_journal() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    walcar = walcar_of(apply(pod, answer_for(pod, injector(role="ingress"))))
    assert walcar["command"][-2:] == ["--role", "ingress"]


def test_non_default_admin_port_is_passed_to_the_hooks() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/native-sidecar": "false"})
    inj = injector(ports={"admin": 19901, "metrics": 19902, "kv": 18080, "memcached": 11211, "cql": 9042})
    out = apply(pod, answer_for(pod, inj))
    walcar = walcar_of(out)
    assert pod_config_of(out)["sidecar"]["admin"] == "127.0.0.1:19901"  # where the preStop's --config points
    assert "http://127.0.0.1:19901/readyz" in walcar["lifecycle"]["postStart"]["exec"]["command"]


def test_env_the_pod_sets_itself_is_kept() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    pod["spec"]["containers"][0]["env"].append({"name": "WALCAR_KV_URL", "value": "http://localhost:8080"})
    web = apply(pod, answer_for(pod))["spec"]["containers"][0]
    assert [e for e in web["env"] if e["name"] == "WALCAR_KV_URL"] == [
        {"name": "WALCAR_KV_URL", "value": "http://localhost:8080"}]


def test_pod_without_annotations_or_env_or_volumes_gets_them_created() -> None:
    pod = deployment_pod(None)
    pod["metadata"]["labels"]["walcar.io/inject"] = "true"  # opted in by label
    del pod["spec"]["volumes"]
    del pod["spec"]["containers"][0]["env"]
    out = apply(pod, answer_for(pod))
    assert out["metadata"]["annotations"]["walcar.io/status"] == "injected"
    assert [v["name"] for v in out["spec"]["volumes"]] == ["walcar-config", "walcar-run", "walcar-nats-creds"]
    assert out["spec"]["containers"][0]["env"][0]["name"] == "WALCAR_KV_URL"


def test_pod_with_null_metadata_maps_is_patched_cleanly() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    pod["metadata"]["labels"] = None
    pod["spec"]["initContainers"] = None
    out = apply(pod, answer_for(pod))
    assert out["metadata"]["labels"] == {"walcar.io/injected": "true"}
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["walcar"]


# --- left alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("annotations", [None, {}, {"walcar.io/inject": "false"}, {"other.io/inject": "true"}])
def test_pod_that_does_not_ask_is_allowed_unchanged(annotations: dict[str, str] | None) -> None:
    answer = answer_for(deployment_pod(annotations))
    assert answer["response"] == {"uid": "b7c5e6a2-2f0d-4b8e-9d1f-5a7c3e9b0d42", "allowed": True}


def test_already_injected_pod_is_left_alone() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    injected = apply(pod, answer_for(pod))
    again = answer_for(injected)  # e.g. a reinvocation, or a pod re-created from its own manifest
    assert again["response"] == {"uid": "b7c5e6a2-2f0d-4b8e-9d1f-5a7c3e9b0d42", "allowed": True}


def test_pod_with_its_own_walcar_container_is_left_alone_with_a_warning() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    pod["spec"]["containers"].append({"name": "walcar", "image": "registry.example/walcar:custom"})
    response = answer_for(pod)["response"]
    assert "patch" not in response
    assert response["allowed"] is True
    # kubectl prints it: the user learns why the pod runs without walcar
    assert response["warnings"] == ["walcar: not injected: the pod already has a container named 'walcar'"]


def test_host_network_pod_is_denied() -> None:
    message = denial(answer_for(deployment_pod({"walcar.io/inject": "true"}, hostNetwork=True)))
    assert "hostNetwork pods are not injected" in message


@pytest.mark.parametrize("restart_policy", ["Never", "OnFailure"])
def test_legacy_sidecar_in_a_job_pod_is_denied(restart_policy: str) -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/native-sidecar": "false"},
                         restartPolicy=restart_policy)
    message = denial(answer_for(pod))
    assert f"restartPolicy {restart_policy} (a Job's pod) needs the native sidecar" in message


def test_native_sidecar_in_a_job_pod_is_injected() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"}, restartPolicy="Never")
    out = apply(pod, answer_for(pod))
    assert out["spec"]["initContainers"][0]["restartPolicy"] == "Always"  # kubelet stops it when the app exits


def test_annotations_past_the_api_servers_cap_are_denied_with_walcars_message() -> None:
    big = "x" * (256 * 1024 - 200)  # the pod alone fits; with walcar's config (hundreds of bytes) it would not
    message = denial(answer_for(deployment_pod({"walcar.io/inject": "true", "example.com/blob": big})))
    assert "over Kubernetes' 262144-byte limit" in message
    assert "the pod's annotations would be" in message


def test_updates_and_other_kinds_are_not_touched() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    assert answer_for(pod, operation="UPDATE")["response"] == {"uid": "b7c5e6a2-2f0d-4b8e-9d1f-5a7c3e9b0d42",
                                                               "allowed": True}
    answer = answer_for({"metadata": {"name": "x"}, "spec": {}}, kind="Service")
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert "pods only" in answer["response"]["warnings"][0]


# --- malformed reviews: an answer that says why, never an exception -------------------------


def test_body_that_is_not_json_is_a_400_admission_review() -> None:
    status, answer, _ = injector().handle(b"{this is not json")
    assert status == 400
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["allowed"] is False
    assert "not JSON" in answer["response"]["status"]["message"]


@pytest.mark.parametrize(("review", "why"), [
    ([], "expected an AdmissionReview object"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "no `request`"),
    ({"request": {"kind": {"kind": "Pod"}, "object": {}}}, "request.uid"),
    ({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": "pod"}}, "not a pod"),
    ({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE",
                  "object": {"metadata": {"annotations": {"walcar.io/inject": True}}}}}, "strings to strings"),
    ({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE",
                  "object": {"metadata": {"annotations": {"walcar.io/inject": "true"}}, "spec": []}}}, "`spec`"),
    ({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE",
                  "object": {"metadata": {"annotations": {"walcar.io/inject": "true"}},
                             "spec": {"containers": "web"}}}}, "spec.containers"),
])
def test_malformed_review_is_allowed_with_a_warning_that_says_why(review: Any, why: str) -> None:
    status, answer, decision = injector().handle(body(review))
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert why in response["warnings"][0]
    assert decision.outcome == "malformed"


def test_uid_and_version_are_echoed_even_when_malformed() -> None:
    review = {"apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "abc", "kind": {"kind": "Pod"},
                                                                    "object": None}}
    _, answer, _ = injector().handle(body(review))
    assert answer["apiVersion"] == "admission.k8s.io/v1beta1"
    assert answer["response"]["uid"] == "abc"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


container_like = st.dictionaries(st.sampled_from(["name", "image", "ports", "env"]),
                                 json_values | st.lists(st.dictionaries(
                                     st.sampled_from(["name", "containerPort", "value"]), json_values), max_size=3),
                                 max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    annotations=st.dictionaries(st.sampled_from(["walcar.io/inject", "walcar.io/protocols", "walcar.io/cpu",
                                                 "walcar.io/namespace", "walcar.io/memory", "walcar.io/x"]),
                                st.text(max_size=12) | st.just("true"), max_size=5),
    spec_noise=st.dictionaries(st.sampled_from(["containers", "initContainers", "volumes",
                                                "terminationGracePeriodSeconds"]),
                               json_values | st.lists(container_like, min_size=1, max_size=3), max_size=3),
)
def test_any_review_gets_a_well_formed_answer(annotations: dict[str, str], spec_noise: dict[str, Any]) -> None:
    pod = deployment_pod(annotations)
    pod["spec"].update(spec_noise)
    status, answer, decision = injector().handle(body(admission_review(pod)))
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "b7c5e6a2-2f0d-4b8e-9d1f-5a7c3e9b0d42"
    assert isinstance(response["allowed"], bool)
    assert decision.outcome != "error"
    if "patch" in response:
        jsonpatch.apply_patch(pod, patch_of(answer))  # whatever we send applies cleanly


@settings(max_examples=200, deadline=None)
@given(review=json_values)
def test_arbitrary_json_never_breaks_the_injector(review: Any) -> None:
    status, answer, decision = injector().handle(body(review))
    assert status == 200
    assert isinstance(answer["response"]["allowed"], bool)
    assert decision.outcome != "error"


# --- invalid annotations: denied, with every reason ----------------------------------------


@pytest.mark.parametrize(("annotations", "why"), [
    ({"walcar.io/inject": "yes"}, 'walcar.io/inject: expected "true" or "false", got \'yes\''),
    ({"walcar.io/protocols": "memcached,redis", "walcar.io/namespace": "sessions"},
     "walcar.io/protocols: unknown protocol(s) 'redis' (known: memcached, cql, kv)"),
    ({"walcar.io/protocols": " , "}, "walcar.io/protocols: name at least one of memcached, cql, kv"),
    ({"walcar.io/cpu": "lots"}, "walcar.io/cpu: 'lots' is not a Kubernetes quantity (e.g. '250m')"),
    ({"walcar.io/cpu": "0"}, "walcar.io/cpu: must be greater than zero"),
    ({"walcar.io/memory": "128m"}, "walcar.io/memory: '128m' means milli-bytes; did you mean '128Mi'?"),
    ({"walcar.io/log-level": "verbose"}, "walcar.io/log-level: expected one of debug, info, warning, error"),
    ({"walcar.io/native-sidecar": "maybe"}, "walcar.io/native-sidecar: expected \"true\" or \"false\""),
    ({"walcar.io/namespace": "Orders!"}, "walcar.io/namespace: 'Orders!' is not a walcar namespace name"),
    ({"walcar.io/namespace": "billing"},
     "walcar.io/namespace: unknown namespace 'billing' (the walcar control plane has: orders, playback, sessions)"),
    ({"walcar.io/protocols": "memcached"}, "memcached write(s) to one namespace: set walcar.io/namespace too"),
    ({"walcar.io/protocols": "memcached", "walcar.io/namespace": "orders"},
     "walcar.io/protocols (memcached listener): namespace 'orders' has no memcached target to read from"),
    ({"walcar.io/protocols": "cql", "walcar.io/namespace": "orders"},
     "walcar.io/protocols (cql listener): set `upstream` or give namespace 'orders' a cassandra target"),
])
def test_invalid_annotation_is_denied_with_the_reason(annotations: dict[str, str], why: str) -> None:
    pod = deployment_pod({"walcar.io/inject": "true", **annotations})
    message = denial(answer_for(pod))
    assert message.startswith("walcar: ")
    assert why in message


def test_every_invalid_annotation_is_reported_at_once() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/cpu": "lots", "walcar.io/memory": "-1",
                          "walcar.io/log-level": "loud"})
    message = denial(answer_for(pod))
    assert "walcar.io/cpu" in message
    assert "walcar.io/memory" in message
    assert "walcar.io/log-level" in message


def test_port_clash_with_the_app_is_denied() -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    pod["spec"]["containers"][0]["ports"].append({"containerPort": 8080, "protocol": "TCP"})
    message = denial(answer_for(pod))
    assert "container 'web' declares port 8080, which walcar uses (walcar-kv)" in message


def test_unknown_walcar_annotation_is_a_warning_not_a_denial() -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/protocol": "memcached"})
    answer = answer_for(pod)
    assert answer["response"]["allowed"] is True
    assert answer["response"]["warnings"] == ["walcar: unknown annotation walcar.io/protocol ignored"]
    assert all(len(w) <= 120 for w in answer["response"]["warnings"])


# --- a bug answers per failure policy ------------------------------------------------------


def _explode(*_: Any) -> Any:
    raise RuntimeError("boom")


def test_internal_error_denies_when_the_policy_is_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "pod_config", _explode)
    status, answer, decision = injector().handle(body(admission_review(deployment_pod({"walcar.io/inject": "true"}))))
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"] == {"code": 500, "message": "walcar injector error: RuntimeError: boom"}
    assert decision.outcome == "error"


def test_internal_error_allows_with_a_warning_when_the_policy_is_ignore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "pod_config", _explode)
    inj = injector(failure_policy="Ignore")
    _, answer, _ = inj.handle(body(admission_review(deployment_pod({"walcar.io/inject": "true"}))))
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert answer["response"]["warnings"] == ["walcar injector error: RuntimeError: boom"]


# --- settings and control plane ------------------------------------------------------------


@pytest.mark.parametrize(("document", "why"), [
    ({"ports": {"admin": 8080}}, "every port must differ"),
    ({"protocols": ["redis"]}, "Invalid enum value 'redis' - at `$.protocols[0]`"),
    ({"imagee": "x"}, "unknown field `imagee`"),
    ({"drain_deadline": "soon"}, "expected a duration"),
    ({"cert_file": "/tls.crt"}, "cert_file and key_file go together"),
])
def test_bad_injector_settings_are_refused(document: dict[str, Any], why: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse(document)
    assert why in str(info.value)


def test_invalid_control_plane_is_refused_at_start(tmp_path: Any) -> None:
    path = tmp_path / "walcar.yaml"
    path.write_text("namespaces:\n  orders:\n    partitions: many\n")
    with pytest.raises(config_mod.ConfigError) as info:
        render.load_control_plane(path)
    assert info.value.errors == ["namespaces.orders.partitions: expected int, got str"]


def test_patch_is_base64_json_patch() -> None:
    answer = answer_for(deployment_pod({"walcar.io/inject": "true"}))
    ops = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert {op["op"] for op in ops} == {"add"}
    assert all(op["path"].startswith(("/metadata/", "/spec/")) for op in ops)


# --- the postStart helper of non-native sidecars ------------------------------------------


class _Readyz(http.server.BaseHTTPRequestHandler):
    ready_after = 0.0

    def do_GET(self) -> None:
        status = 200 if time.monotonic() >= self.ready_after else 503
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def readyz() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_wait_ready_returns_once_the_sidecar_is_ready(readyz: Any) -> None:
    _Readyz.ready_after = time.monotonic() + 0.5
    url = f"http://127.0.0.1:{readyz.server_address[1]}/readyz"
    started = time.monotonic()
    assert cli.main(["inject", "wait-ready", "--url", url, "--timeout", "10", "--interval", "0.05"]) == 0
    assert 0.4 <= time.monotonic() - started < 5


def test_wait_ready_fails_when_the_sidecar_never_gets_ready(readyz: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _Readyz.ready_after = time.monotonic() + 3600
    url = f"http://127.0.0.1:{readyz.server_address[1]}/readyz"
    assert cli.main(["inject", "wait-ready", "--url", url, "--timeout", "0.5", "--interval", "0.05"]) == 1
    assert f"{url} not ready after 0.5s" in capsys.readouterr().err
