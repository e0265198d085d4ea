"""The chart: lint, render with every option, check what the cluster would get; then the pod it injects, run here.

`helm template` output is parsed and checked for what users rely on: the webhook only
sees opted-in pods and never kube-system, its caBundle is the CA that signed the
injector's certificate, probes and ports line up, the control plane passes `walcar
config check`, and bad values are refused by the schema with a readable message.
The last test takes the injector settings and control plane the chart renders,
injects a Deployment's pod, materialises the downward-API config file the way kubelet
would, and runs the injected container's own command against a real nats-server.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar import __version__
from sidecar.inject import render
from sidecar.inject.patch import Injector
from sidecar.inject.settings import parse as parse_settings
from tests.support.procs import free_port, wait_for
from tests.support.services import HELM, Services
from tests.unit.test_inject import admission_review, apply, body, deployment_pod, walcar_of

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "walcar"
RELEASE = "walcar"
NAMESPACE = "walcar-system"

OPTIONS: dict[str, list[str]] = {
    "defaults": [],
    "cert-manager": ["--set", "certManager.enabled=true"],
    "cert-manager-issuer": ["--set", "certManager.enabled=true", "--set", "certManager.issuerRef.name=corp-ca",
                            "--set", "certManager.issuerRef.kind=ClusterIssuer"],
    "drain": ["--set", "drain.enabled=true"],
    "servicemonitor": ["--set", "drain.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"],
    "podmonitor": ["--set", "metrics.podMonitor.enabled=true"],
    "failure-ignore": ["--set", "webhook.failurePolicy=Ignore"],
    "legacy-sidecar": ["--set", "sidecar.nativeSidecar=false"],
    "credentials": ["--set", "nats.credentialsSecret=walcar-nats", "--set", "drain.enabled=true",
                    "--set", "sidecar.secretMounts[0].secret=cassandra-password",
                    "--set", "sidecar.secretMounts[0].path=/var/run/secrets/walcar/cassandra"],
    "nats-tls": ["--set", "nats.tls.secret=walcar-nats-tls", "--set", "nats.tls.serverName=nats.nats.svc",
                 "--set", "drain.enabled=true"],
}


@pytest.fixture(scope="session")
def helm(services: Services) -> str:
    assert HELM.exists(), f"{HELM} missing: scripts/services up helm"
    return str(HELM)


# The Kubernetes version scripts/services runs (K8S_VERSION). Rendering needs one: a helm built with
# `go install` assumes v1.20.0 without it, which the chart's kubeVersion refuses.
KUBE_VERSION = "1.37.2"
# What the rendered manifests are validated against offline: the chart's kubeVersion floor (1.25),
# the last version before native sidecars, the first with them, and the one tested live.
SCHEMA_VERSIONS = ("1.25.0", "1.28.0", "1.29.0", "1.33.0", "1.37.0")
# Custom resources (cert-manager, Prometheus Operator) have no schema in kubernetes-validate.
CUSTOM_KINDS = {"Certificate", "Issuer", "ServiceMonitor", "PodMonitor"}


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    if args[0] in ("template", "lint") and not any(a.startswith("--kube-version") for a in args):
        args = (*args, "--kube-version", KUBE_VERSION)
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def template(helm: str, *args: str) -> list[dict[str, Any]]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == "Deployment"
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1
    return found[0]


def webhook(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config = one(docs, "MutatingWebhookConfiguration")
    assert len(config["webhooks"]) == 1
    return config["webhooks"][0]


# --- lint and render ------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_lint_is_clean(helm: str, option: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *OPTIONS[option])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_renders_a_control_plane_that_walcar_accepts(helm: str, option: str, tmp_path: Path) -> None:
    docs = template(helm, *OPTIONS[option])
    data = config_map(docs)
    path = tmp_path / "walcar.yaml"
    path.write_text(data["walcar.yaml"])
    check = subprocess.run([shutil.which("walcar") or "walcar", "config", "check", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    # and the injector accepts its settings
    settings = parse_settings(yaml.safe_load(data["injector.yaml"]))
    assert settings.control_plane == "/etc/walcar/walcar.yaml"


def test_default_install(helm: str) -> None:
    docs = template(helm)
    assert kinds(docs) == ["ConfigMap", "Deployment", "MutatingWebhookConfiguration", "Pod", "PodDisruptionBudget",
                           "Secret", "Service", "ServiceAccount"]
    injector = deployment(docs, "injector")
    assert injector["spec"]["replicas"] == 2
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == injector["spec"]["selector"]


def test_webhook_sees_only_opted_in_pods_and_never_kube_system(helm: str) -> None:
    hook = webhook(template(helm))
    assert hook["name"] == "inject.walcar.io"
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 10
    selector = hook["namespaceSelector"]
    assert selector["matchLabels"] == {"walcar.io/injection": "enabled"}
    excluded = next(e for e in selector["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["operator"] == "NotIn"
    assert "kube-system" in excluded["values"]
    assert NAMESPACE in excluded["values"]  # the injector never waits on itself
    assert hook["objectSelector"] == {"matchExpressions": [
        {"key": "walcar.io/inject", "operator": "NotIn", "values": ["false"]}]}


def test_kube_system_stays_excluded_whatever_the_selector(helm: str) -> None:
    hook = webhook(template(helm, "--set", "webhook.namespaceSelector.matchLabels=null",
                            "--set-json", "webhook.excludeNamespaces=[]"))
    assert "matchLabels" not in hook["namespaceSelector"]
    excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["values"] == ["kube-system", NAMESPACE]
    hook = webhook(template(helm, "--set-json", "webhook.excludeNamespaces=[\"kube-system\",\"monitoring\"]"))
    excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["values"] == ["kube-system", "monitoring", NAMESPACE]


def test_ca_bundle_is_the_ca_that_signed_the_injector_certificate(helm: str) -> None:
    docs = template(helm)
    hook = webhook(docs)
    service = one(docs, "Service")
    assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": NAMESPACE,
                                               "path": "/mutate", "port": 443}
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    secret = one(docs, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["ca.crt"]) == base64.b64decode(hook["clientConfig"]["caBundle"])
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    svc = service["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}.svc" in names  # what the API server dials
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    # the injector serves exactly that Secret, at the paths its settings name
    injector = deployment(docs, "injector")
    volumes = {v["name"]: v for v in injector["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    settings = yaml.safe_load(config_map(docs)["injector.yaml"])
    mounts = {m["name"]: m["mountPath"] for m in injector["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert settings["cert_file"] == f"{mounts['tls']}/tls.crt"
    assert settings["key_file"] == f"{mounts['tls']}/tls.key"


def test_ports_and_probes_line_up(helm: str) -> None:
    docs = template(helm)
    container = deployment(docs, "injector")["spec"]["template"]["spec"]["containers"][0]
    settings = yaml.safe_load(config_map(docs)["injector.yaml"])
    assert container["command"] == ["walcar", "inject", "serve", "--config", "/etc/walcar/injector.yaml",
                                    "--log-level", "info"]
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    assert settings["bind"].endswith(":8443")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment(docs, "injector")["spec"]["selector"]["matchLabels"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert settings["image"] == container["image"] == f"ghcr.io/walcar/walcar:{__version__}"


def test_config_change_rolls_the_injector(helm: str) -> None:
    def checksum(*args: str) -> str:
        injector = deployment(template(helm, *args), "injector")
        return injector["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "config.namespaces.default.partitions=32")


def test_cert_manager_replaces_the_generated_ca(helm: str) -> None:
    docs = template(helm, *OPTIONS["cert-manager"])
    assert "Secret" not in kinds(docs)
    config = one(docs, "MutatingWebhookConfiguration")
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    serving = next(d for d in docs if d["kind"] == "Certificate" and not d["spec"].get("isCA"))
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NAMESPACE}/{serving['metadata']['name']}"
    injector = deployment(docs, "injector")
    volumes = {v["name"]: v for v in injector["spec"]["template"]["spec"]["volumes"]}
    assert serving["spec"]["secretName"] == volumes["tls"]["secret"]["secretName"]
    svc = one(docs, "Service")["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    # self-signed root -> CA certificate -> CA issuer -> serving certificate
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    assert serving["spec"]["issuerRef"]["name"] in issuers
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    ca_cert = next(d for d in docs if d["kind"] == "Certificate" and d["spec"].get("isCA"))
    assert ca_issuer == {"ca": {"secretName": ca_cert["spec"]["secretName"]}}
    assert issuers[ca_cert["spec"]["issuerRef"]["name"]] == {"selfSigned": {}}


def test_cert_manager_with_an_existing_issuer_creates_none(helm: str) -> None:
    docs = template(helm, *OPTIONS["cert-manager-issuer"])
    assert "Issuer" not in kinds(docs)
    certificate = one(docs, "Certificate")
    assert certificate["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                "group": "cert-manager.io"}


def test_drain_deployment_only_drains_and_sidecars_only_ingest(helm: str) -> None:
    docs = template(helm, *OPTIONS["credentials"])
    drain = deployment(docs, "drain")
    pod = drain["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["walcar", "run", "--config", "/etc/walcar/walcar.yaml", "--role", "drain"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # admin is loopback-only (kubectl exec ... walcar status): only the open port is declared
    assert container["ports"] == [{"name": "metrics", "containerPort": 9902, "protocol": "TCP"}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/walcar"
    assert volumes["config"]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    control_plane = yaml.safe_load(config_map(docs)["walcar.yaml"])
    assert control_plane["sidecar"]["admin"] == "127.0.0.1:9901"
    assert control_plane["sidecar"]["metrics"] == "0.0.0.0:9902"
    # the admin token: a generated Secret, mounted where the config says
    token_secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("admin-token"))
    assert volumes["admin-token"]["secret"]["secretName"] == token_secret["metadata"]["name"]
    assert control_plane["sidecar"]["admin_token_file"] == f"{mounts['admin-token']}/token"
    assert len(base64.b64decode(token_secret["data"]["token"])) >= 32
    assert control_plane["sidecar"]["nats_creds"] == f"{mounts['nats-creds']}/nats.creds"
    assert volumes["nats-creds"]["secret"]["secretName"] == "walcar-nats"
    assert mounts["secret-0"] == "/var/run/secrets/walcar/cassandra"
    assert pod["terminationGracePeriodSeconds"] > 30  # beyond the drain deadline
    assert yaml.safe_load(config_map(docs)["injector.yaml"])["role"] == "ingress"
    assert yaml.safe_load(config_map(template(helm))["injector.yaml"])["role"] == "all"


def test_nats_tls_secret_reaches_the_drain_deployment_and_the_injector(helm: str) -> None:
    docs = template(helm, *OPTIONS["nats-tls"])
    pod = deployment(docs, "drain")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["nats-tls"]["secret"] == {"secretName": "walcar-nats-tls"}  # whole: renewals reach the pod
    control_plane = yaml.safe_load(config_map(docs)["walcar.yaml"])
    assert control_plane["sidecar"]["nats_tls"] == {
        "ca_file": f"{mounts['nats-tls']}/ca.crt", "cert_file": f"{mounts['nats-tls']}/tls.crt",
        "key_file": f"{mounts['nats-tls']}/tls.key", "server_name": "nats.nats.svc"}
    settings = parse_settings(yaml.safe_load(config_map(docs)["injector.yaml"]))
    assert settings.nats_tls_secret == "walcar-nats-tls" and settings.nats_tls_server_name == "nats.nats.svc"


def test_service_monitor_scrapes_the_drain_admin_metrics(helm: str) -> None:
    docs = template(helm, *OPTIONS["servicemonitor"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    drain_service = next(d for d in docs if d["kind"] == "Service"
                         and d["metadata"]["labels"]["app.kubernetes.io/component"] == "drain")
    labels = drain_service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert [p["name"] for p in drain_service["spec"]["ports"]] == ["metrics"]  # admin is never behind it


def test_service_monitor_without_the_drain_says_what_to_do(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "metrics.serviceMonitor.enabled=true")
    assert result.returncode != 0
    assert "set drain.enabled=true (for injected sidecars use metrics.podMonitor.enabled)" in result.stderr


def test_pod_monitor_scrapes_every_injected_sidecar(helm: str) -> None:
    monitor = one(template(helm, *OPTIONS["podmonitor"]), "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"walcar.io/injected": "true"}}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "walcar-metrics"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_failure_policy_ignore_reaches_webhook_and_injector(helm: str) -> None:
    docs = template(helm, *OPTIONS["failure-ignore"])
    assert webhook(docs)["failurePolicy"] == "Ignore"
    assert yaml.safe_load(config_map(docs)["injector.yaml"])["failure_policy"] == "Ignore"


def test_release_name_and_namespace_flow_into_names(helm: str) -> None:
    docs = template(helm, "--set", "fullnameOverride=wal")
    assert one(docs, "Service")["metadata"]["name"] == "wal-injector"
    assert webhook(docs)["clientConfig"]["service"]["name"] == "wal-injector"


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "webhook.failurePolicy=Maybe"], "at '/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'"),
    (["--set", "injector.replicaCount=two"], "at '/injector/replicaCount': got string, want integer"),
    (["--set", "injector.replicaCount=0"], "at '/injector/replicaCount': minimum: got 0, want 1"),
    (["--set", "webhook.timeoutSeconds=60"], "at '/webhook/timeoutSeconds': maximum: got 60, want 30"),
    (["--set-json", 'sidecar.protocols=["redis"]'], "at '/sidecar/protocols/0': value must be one of"),
    (["--set", "nats.url=localhost:4222"], "at '/nats/url': 'localhost:4222' does not match pattern"),
    (["--set", "sidecar.logLevel=loud"], "at '/sidecar/logLevel': value must be one of"),
    (["--set-json", 'config.namespaces={"Bad Name":{}}'],
     "at '/config/namespaces': additional properties 'Bad Name' not allowed"),
    (["--set", "injector.replicas=3"], "additional properties 'replicas' not allowed"),
])
def test_invalid_values_are_refused_by_the_schema(helm: str, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it (install needs a cluster; a renamed copy renders without one)."""
    chart = tmp_path / "walcar"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    result = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                      "--show-only", "templates/notes.yaml", *args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_tell_the_next_steps(helm: str, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path)
    assert f"kubectl -n {NAMESPACE} rollout status deploy/walcar-injector" in notes
    assert "kubectl label namespace <app-namespace> walcar.io/injection=enabled" in notes
    assert 'walcar.io/inject: "true"' in notes
    assert "walcar.io/namespace: \"default\"" in notes
    notes = render_notes(helm, tmp_path / "creds", "--set", "nats.credentialsSecret=walcar-nats")
    assert "create secret generic walcar-nats --from-file=nats.creds=" in notes
    notes = render_notes(helm, tmp_path / "open", "--set", "webhook.namespaceSelector.matchLabels=null")
    assert f"Every namespace except kube-system, kube-public, kube-node-lease, {NAMESPACE} reaches" in notes


# --- the chart's injector output, run as a process ------------------------------------------

_FIELD_REF = re.compile(r"^metadata\.annotations\['([^']+)'\]$")


def materialise_downward_api(pod: dict[str, Any], volume: dict[str, Any], directory: Path) -> None:
    """Write a downwardAPI volume's files the way kubelet does (annotation fieldRefs only)."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in volume["downwardAPI"]["items"]:
        match = _FIELD_REF.match(item["fieldRef"]["fieldPath"])
        assert match, f"unsupported fieldRef {item['fieldRef']}"
        (directory / item["path"]).write_text(pod["metadata"]["annotations"][match.group(1)])


def test_injected_sidecar_starts_and_accepts_a_durable_write(helm: str, services: Services, unique: str,
                                                             tmp_path: Path) -> None:
    admin_port, kv_port = free_port(), free_port()
    values = {
        "nats": {"url": services.nats_url},
        "sidecar": {"ports": {"admin": admin_port, "metrics": free_port(), "kv": kv_port, "memcached": free_port(),
                              "cql": free_port()},
                    "drainDeadlineSeconds": 10},
        "config": {"sidecar": {"region": "test", "shutdown_grace": "0s"},
                   "namespaces": {unique: {"partitions": 4, "replay_window": "1h"}}},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    data = config_map(template(helm, "--values", str(values_file)))

    # the injector, configured exactly as the chart configures it (only the mount path substituted)
    control_plane_path = tmp_path / "configmap" / "walcar.yaml"
    control_plane_path.parent.mkdir()
    control_plane_path.write_text(data["walcar.yaml"])
    settings_document = yaml.safe_load(data["injector.yaml"])
    settings_document["control_plane"] = str(control_plane_path)
    injector = Injector(parse_settings(settings_document), render.load_control_plane(control_plane_path))

    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": unique, "walcar.io/protocols": "kv"})
    status, answer, _ = injector.handle(body(admission_review(pod)))
    assert status == 200 and answer["response"]["allowed"], answer
    pod = apply(pod, answer)
    walcar = walcar_of(pod)

    # kubelet's view: the config volume mounted where the container expects it
    root = tmp_path / "pod-root"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    substitutions: dict[str, str] = {}
    for mount in walcar["volumeMounts"]:
        local = root / mount["mountPath"].lstrip("/")
        if "emptyDir" in volumes[mount["name"]]:
            local.mkdir(parents=True)
        else:
            materialise_downward_api(pod, volumes[mount["name"]], local)
        substitutions[mount["mountPath"]] = str(local)

    def substitute(arg: str) -> str:
        for mount_path, local in substitutions.items():
            if arg.startswith(mount_path + "/"):
                return local + arg[len(mount_path):]
        return arg

    command = [substitute(arg) for arg in walcar["command"]]
    assert command[0] == "walcar"
    command[0] = shutil.which("walcar") or f"{Path(sys.executable).parent}/walcar"
    check = subprocess.run([command[0], "config", "check", command[3]], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr

    ports = {p["name"]: p["containerPort"] for p in walcar["ports"]}
    probe = walcar["readinessProbe"]["httpGet"]
    ready_url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    log_path = tmp_path / "walcar.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**env, "PATH": "/usr/bin:/bin",
                                                                                  "PYTHONUNBUFFERED": "1"})
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                return httpx.get(ready_url, timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return False

        startup = walcar["startupProbe"]
        wait_for(ready, startup["periodSeconds"] * startup["failureThreshold"], interval=0.1, what="/readyz")
        health = walcar["livenessProbe"]["httpGet"]
        assert httpx.get(f"http://127.0.0.1:{ports[health['port']]}{health['path']}").status_code == 200

        # the app writes where the injected env tells it to
        response = httpx.post(f"{env['WALCAR_KV_URL']}/v1/log/{env['WALCAR_NAMESPACE']}",
                              json={"key": "k", "text": "v"}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["durable"] == "true"

        # admin is on loopback with the pod's own token: the app cannot stop the sidecar without it
        refused = httpx.post(f"http://127.0.0.1:{admin_port}/v1/shutdown", json={}, timeout=10)
        assert refused.status_code == 401, refused.text
        # the preStop hook can: it reads the address and the token file through the pod's config
        pre_stop = [substitute(arg) for arg in walcar["lifecycle"]["preStop"]["exec"]["command"]]
        pre_stop[0] = command[0]
        hook = subprocess.run(pre_stop, capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0, hook.stderr
    finally:
        # pod termination: the sidecar must be gone within the grace period the injector set
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        try:
            code = proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"sidecar outlived terminationGracePeriodSeconds={grace}") from None
    assert code == 0, log_path.read_text()
    assert time.monotonic() - started < grace
    assert "event=ready" in log_path.read_text()


def test_chart_defaults_inject_a_working_pod_spec(helm: str) -> None:
    """The chart's settings and the injector agree: a default install injects, and the pod config is valid."""
    data = config_map(template(helm))
    settings = parse_settings(yaml.safe_load(data["injector.yaml"]))
    control_plane = yaml.safe_load(data["walcar.yaml"])
    injector = Injector(settings, copy.deepcopy(control_plane))
    pod = deployment_pod({"walcar.io/inject": "true"})
    _, answer, decision = injector.handle(json.dumps(admission_review(pod)).encode())
    assert decision.outcome == "injected", decision.message
    walcar = walcar_of(apply(pod, answer))
    assert walcar["image"] == f"ghcr.io/walcar/walcar:{__version__}"
    assert walcar["restartPolicy"] == "Always"
    assert yaml.safe_load(data["walcar.yaml"])["sidecar"]["admin"] == "127.0.0.1:9901"


# --- what a real API server showed that `helm template` did not (issue 23) --------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_variant_is_valid_against_the_kubernetes_schemas(helm: str, option: str, version: str) -> None:
    """Offline: field names, types and required fields, as that version's API server would check them."""
    import kubernetes_validate

    docs = template(helm, *OPTIONS[option], "--kube-version", version)  # below 1.29: auto = legacy mode
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} ({option}, {version}): {exc.message} "
                        f"at {list(exc.path)}")
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize(("version", "native"), [("1.25.0", "false"), ("1.28.9", "false"), ("1.29.0", "true"),
                                                 ("1.37.2", "true")])
def test_native_sidecar_follows_the_cluster_version(helm: str, version: str, native: str) -> None:
    """Below 1.29 the API server drops restartPolicy from init containers: every injected pod would fail."""
    settings = yaml.safe_load(config_map(template(helm, "--kube-version", version))["injector.yaml"])
    assert settings["native_sidecar"] is (native == "true")


def test_native_sidecar_forced_on_an_old_cluster_is_refused(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "sidecar.nativeSidecar=true",
                      "--kube-version", "1.28.0")
    assert result.returncode != 0
    assert "sidecar.nativeSidecar=true needs Kubernetes >= 1.29 (this cluster is v1.28.0)" in result.stderr
    forced_off = config_map(template(helm, *OPTIONS["legacy-sidecar"]))
    assert yaml.safe_load(forced_off["injector.yaml"])["native_sidecar"] is False


def test_clusters_older_than_the_schemas_are_refused(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.24.9")
    assert result.returncode != 0
    assert "chart requires kubeVersion: >=1.25.0-0" in result.stderr


def test_one_injector_gets_no_pdb_that_would_block_node_drains(helm: str) -> None:
    docs = template(helm, "--set", "injector.replicaCount=1")
    assert "PodDisruptionBudget" not in kinds(docs)
    assert one(template(helm, "--set", "injector.replicaCount=3"), "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_pdb_that_could_never_allow_an_eviction_is_refused(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "injector.podDisruptionBudget.minAvailable=2")
    assert result.returncode != 0
    assert "minAvailable (2) must be below injector.replicaCount (2)" in result.stderr
    percent = template(helm, "--set", "injector.podDisruptionBudget.minAvailable=50%")
    assert one(percent, "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"


def test_helm_test_pod_checks_the_injector_through_its_service_trusting_only_the_ca(helm: str) -> None:
    docs = template(helm)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    service = one(docs, "Service")
    url = f"https://{service['metadata']['name']}.{NAMESPACE}.svc:443/healthz"
    assert container["command"] == ["walcar", "inject", "health", "--url", url,
                                    "--ca-file", "/etc/walcar-injector/ca/ca.crt"]
    # the DNS name it calls is one the serving certificate holds
    secret = one(docs, "Secret")
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in names
    # only the CA is mounted, never the serving key
    volume = pod["spec"]["volumes"][0]
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "items": [{"key": "ca.crt",
                                                                                    "path": "ca.crt"}]}
    assert pod["spec"]["restartPolicy"] == "Never"
