"""The chart and the injector against a real API server (scripts/services up k8s: etcd, kube-apiserver,
kube-controller-manager on 127.0.0.1; no kubelet, so pods stay Pending, but admission, mutation,
PodSecurity and the controllers are all real).

The chart is `helm install`ed as a user would. Its webhook names the injector Service, which
cannot reach a process on this machine (no kube-proxy; EndpointSlices refuse loopback), so the
injector runs here (`walcar inject serve`, with the settings and control plane the chart rendered)
and a copy of the chart's webhook, differing only in a `url:` clientConfig and a test CA, sends
pods to it. The chart's own webhook is installed with failurePolicy Ignore so it stays out of
the way; test_chart_service_webhook_* checks what it does with Fail.

One API server and one install per module; every test makes namespaces of its own.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.integration.test_helm_chart import CHART
from tests.integration.test_injector_tls import Authority, InjectorProcess, issue, make_ca, trusting
from tests.support.kube import K8S_SERVICES, KUBECONFIG, Kube, KubeError, ensure_k8s, wait_until
from tests.support.services import HELM, SCRIPT

RELEASE = "walcar"
RELEASE_NS = "walcar-system"
INJECTOR = f"{RELEASE}-injector"
ADMIN_TOKEN = f"{RELEASE}-admin-token"  # <fullname>-admin-token; fullname is the release when it holds "walcar"
LOCAL_HOOK = "walcar-local-injector"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
OPTED_IN = {"walcar.io/injection": "enabled", **RESTRICTED}
INSTALL_VALUES = ["--set", "webhook.failurePolicy=Ignore", "--set", "drain.enabled=true"]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(HELM), *args, "--kubeconfig", str(KUBECONFIG)], capture_output=True, text=True,
                            timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def kube() -> Iterator[Kube]:
    client = ensure_k8s()
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def release(kube: Kube) -> Iterator[None]:
    """The chart, installed into a namespace that enforces PodSecurity `restricted`."""
    helm("uninstall", RELEASE, "--namespace", RELEASE_NS, check=False)  # a run interrupted before its teardown
    kube.create_namespace(RELEASE_NS, RESTRICTED)
    helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NS, *INSTALL_VALUES)
    yield
    helm("uninstall", RELEASE, "--namespace", RELEASE_NS, check=False)
    kube.delete(f"/api/v1/namespaces/{RELEASE_NS}")


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_ca("walcar-local-injector-ca")


@pytest.fixture(scope="module")
def injector(kube: Kube, release: None, ca: Authority, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[InjectorProcess]:
    """`walcar inject serve` with what the chart put in its ConfigMap, and the chart's webhook pointed at it."""
    workdir = tmp_path_factory.mktemp("injector")
    data = kube.get(f"/api/v1/namespaces/{RELEASE_NS}/configmaps/{RELEASE}-config")["data"]
    chart_settings = yaml.safe_load(data["injector.yaml"])
    for local in ("bind", "cert_file", "key_file", "control_plane"):
        chart_settings.pop(local)
    chart_settings.setdefault("nats_creds_secret", None)  # the chart's, not the TLS tests' fixture default
    process = InjectorProcess(workdir, ca, **chart_settings, cert_reload_interval="200ms")
    (workdir / "walcar.yaml").write_text(data["walcar.yaml"])
    process.start(trusting(ca, workdir))
    chart_hook = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{INJECTOR}")
    hook = copy.deepcopy(chart_hook["webhooks"][0])
    hook["clientConfig"] = {"url": f"{process.url}/mutate", "caBundle": base64.b64encode(ca.pem()).decode()}
    hook["failurePolicy"] = "Fail"
    kube.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{LOCAL_HOOK}")
    kube.create("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": LOCAL_HOOK}, "webhooks": [hook]})
    kube.create_namespace("walcar-probe", OPTED_IN)
    settled(kube, "walcar-probe", admitted_injected, "the local webhook to take effect")
    kube.delete("/api/v1/namespaces/walcar-probe")
    yield process
    kube.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{LOCAL_HOOK}")
    if process.proc is not None and process.proc.poll() is None:
        assert process.stop() == 0, process.log()


def local_hook(kube: Kube) -> dict[str, Any]:
    return kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{LOCAL_HOOK}")


def set_local_hook(kube: Kube, **fields: Any) -> None:
    config = local_hook(kube)
    config["webhooks"][0].update(fields)
    kube.request("PUT", f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{LOCAL_HOOK}",
                 config)


@pytest.fixture
def namespace(kube: Kube, injector: InjectorProcess, request: pytest.FixtureRequest) -> Iterator[str]:
    """An opted-in namespace enforcing PodSecurity `restricted`, named after the test."""
    name = "t-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    kube.create_namespace(name, OPTED_IN)
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


def pod_spec(**overrides: Any) -> dict[str, Any]:
    """An app that PodSecurity `restricted` admits."""
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "web", "image": "registry.example/shop-web:4.1",
            "ports": [{"containerPort": 8000}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
    }
    spec.update(overrides)
    return spec


def pod(name: str, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "spec": pod_spec(**spec),
            "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}}}


def create_pod(kube: Kube, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return kube.create(f"/api/v1/namespaces/{namespace}/pods", manifest)


def dry_run(kube: Kube, namespace: str, manifest: dict[str, Any]) -> dict[str, Any] | KubeError:
    try:
        return kube.create(f"/api/v1/namespaces/{namespace}/pods", manifest, dry_run=True)
    except KubeError as exc:
        return exc


def settled(kube: Kube, namespace: str, check: Any, what: str) -> None:
    """Webhook configuration reaches the API server's admission through a watch: wait until a dry run shows it."""
    wait_until(lambda: check(dry_run(kube, namespace, pod("probe", WANTS))), 15, what=what)


def refused(answer: dict[str, Any] | KubeError) -> bool:
    return isinstance(answer, KubeError) and answer.code == 500


def admitted_injected(answer: dict[str, Any] | KubeError) -> bool:
    return not isinstance(answer, KubeError) and injected(answer)


def admitted_plain(answer: dict[str, Any] | KubeError) -> bool:
    return not isinstance(answer, KubeError) and not injected(answer)


def containers(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]


def injected(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("annotations", {}).get("walcar.io/status") == "injected"


WANTS = {"walcar.io/inject": "true"}


# --- the control plane itself ---------------------------------------------------------------


def test_control_plane_is_the_pinned_version_on_loopback_only(kube: Kube) -> None:
    assert kube.get("/version")["gitVersion"] == "v1.37.2"  # helm's kubeVersion checks read this
    status = subprocess.run([sys.executable, str(SCRIPT), "status", "--json"], capture_output=True, text=True)
    pids = {row["pid"] for row in json.loads(status.stdout) if row["service"] in K8S_SERVICES}
    assert None not in pids and len(pids) == 3
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line.split()[3] for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert len(ours) >= 4  # etcd client + peer, kube-apiserver, kube-controller-manager
    assert all(address.startswith("127.0.0.1:") for address in ours), ours
    apiserver = next(row["pid"] for row in json.loads(status.stdout) if row["service"] == "kube-apiserver")
    cmdline = Path(f"/proc/{apiserver}/cmdline").read_bytes().split(b"\0")
    assert b"--enable-aggregator-routing=true" in cmdline  # webhooks dialled at endpoints, never a ClusterIP


# --- a Deployment's pods, through kube-controller-manager and PodSecurity -----------------------


def test_deployment_pods_are_injected_and_pass_pod_security_restricted(kube: Kube, namespace: str) -> None:
    kube.create(f"/apis/apps/v1/namespaces/{namespace}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}, "annotations": WANTS}, "spec": pod_spec()}},
    })
    def two_pods() -> list[dict[str, Any]] | None:
        pods = kube.pods(namespace, "app=web")
        return pods if len(pods) == 2 else None

    pods = wait_until(two_pods, 30, what="the ReplicaSet's two pods")
    for created in pods:
        assert injected(created)
        walcar = created["spec"]["initContainers"][0]
        assert walcar["name"] == "walcar"
        assert walcar["restartPolicy"] == "Always"  # a native sidecar: the server is 1.37
        assert walcar["securityContext"]["runAsNonRoot"] is True
        assert created["metadata"]["labels"]["walcar.io/injected"] == "true"
        config = yaml.safe_load(created["metadata"]["annotations"]["walcar.io/config"])
        assert config["sidecar"]["admin"] == "127.0.0.1:9901"  # the chart's control plane, not a fixture's


def test_chart_injector_pods_pass_pod_security_restricted(kube: Kube, injector: InjectorProcess) -> None:
    """The release namespace enforces `restricted`; the chart's own Deployments still get their pods."""
    pods = wait_until(lambda: kube.pods(RELEASE_NS, "app.kubernetes.io/component=injector") or None, 30,
                      what="the injector Deployment's pods")
    assert len(pods) == 2
    assert kube.pods(RELEASE_NS, "app.kubernetes.io/component=drain")


def test_opted_out_pods_and_other_namespaces_are_untouched(kube: Kube, namespace: str) -> None:
    by_label = create_pod(kube, namespace, pod("label", WANTS, {"walcar.io/inject": "false"}))
    by_annotation = create_pod(kube, namespace, pod("annotation", {"walcar.io/inject": "false"}))
    assert not injected(by_label) and containers(by_label) == ["web"]
    assert not injected(by_annotation) and containers(by_annotation) == ["web"]
    unlabelled = namespace + "-off"
    kube.create_namespace(unlabelled, RESTRICTED)
    try:
        elsewhere = create_pod(kube, unlabelled, pod("asks", WANTS))
        assert not injected(elsewhere) and containers(elsewhere) == ["web"]
    finally:
        kube.delete(f"/api/v1/namespaces/{unlabelled}")
    # kube-system is never sent, even labelled: the control plane must not wait on walcar
    kube.merge_patch("/api/v1/namespaces/kube-system", {"metadata": {"labels": {"walcar.io/injection": "enabled"}}})
    try:
        system = kube.create("/api/v1/namespaces/kube-system/pods", pod(namespace, WANTS), dry_run=True)
        assert not injected(system) and containers(system) == ["web"]
    finally:
        kube.merge_patch("/api/v1/namespaces/kube-system", {"metadata": {"labels": {"walcar.io/injection": None}}})


def test_re_creating_an_injected_pod_does_not_inject_twice(kube: Kube, namespace: str) -> None:
    first = create_pod(kube, namespace, pod("first", WANTS))
    again = copy.deepcopy(first)
    again["metadata"] = {"name": "again", "annotations": first["metadata"]["annotations"],
                         "labels": first["metadata"]["labels"]}
    again.pop("status", None)
    second = create_pod(kube, namespace, again)
    assert containers(second) == containers(first) == ["walcar", "web"]
    assert [v["name"] for v in second["spec"]["volumes"]].count("walcar-config") == 1


# --- denials and warnings with walcar's own message -------------------------------------------


def denied(kube: Kube, namespace: str, manifest: dict[str, Any]) -> str:
    with pytest.raises(KubeError) as caught:
        create_pod(kube, namespace, manifest)
    assert caught.value.code == 400, caught.value.status
    return caught.value.message


def test_bad_annotations_are_denied_with_walcars_message(kube: Kube, namespace: str) -> None:
    message = denied(kube, namespace, pod("bad", {**WANTS, "walcar.io/protocols": "memcache"}))
    assert 'admission webhook "inject.walcar.io" denied the request: walcar: walcar.io/protocols' in message


def test_host_network_pod_is_denied(kube: Kube, namespace: str) -> None:
    message = denied(kube, namespace, pod("hostnet", WANTS, hostNetwork=True))
    assert "walcar: hostNetwork pods are not injected" in message


def test_legacy_sidecar_in_a_pod_that_must_complete_is_denied(kube: Kube, namespace: str) -> None:
    manifest = pod("job", {**WANTS, "walcar.io/native-sidecar": "false"}, restartPolicy="Never")
    assert "needs the native sidecar: as a regular container walcar never exits" in denied(kube, namespace, manifest)
    native = create_pod(kube, namespace, pod("job-native", WANTS, restartPolicy="Never"))
    assert native["spec"]["initContainers"][0]["restartPolicy"] == "Always"


def test_annotations_near_the_cap_are_denied_with_walcars_message(kube: Kube, namespace: str) -> None:
    big = {**WANTS, "example.com/blob": "x" * (256 * 1024 - 200)}
    message = denied(kube, namespace, pod("big", big))
    assert "walcar: with walcar's config" in message
    assert "over Kubernetes' 262144-byte limit" in message
    # without walcar the same pod fits: the refusal is walcar's, not the API server's
    fits = create_pod(kube, namespace, pod("big-alone", {"example.com/blob": big["example.com/blob"]}))
    assert not injected(fits)


def test_app_container_named_walcar_gets_a_warning(kube: Kube, namespace: str) -> None:
    manifest = pod("named", WANTS)
    manifest["spec"]["containers"][0]["name"] = "walcar"
    created = create_pod(kube, namespace, manifest)
    assert not injected(created)
    assert "walcar: not injected: the pod already has a container named 'walcar'" in kube.last_warnings


# --- the injector down: failurePolicy ----------------------------------------------------------


def test_failure_policy_with_the_injector_down(kube: Kube, namespace: str, injector: InjectorProcess,
                                               ca: Authority) -> None:
    injector.stop()
    try:
        settled(kube, namespace, refused, "the API server to see the injector gone")
        with pytest.raises(KubeError) as caught:
            create_pod(kube, namespace, pod("fail", WANTS))
        assert caught.value.code == 500
        assert 'failed calling webhook "inject.walcar.io"' in caught.value.message
        assert "connection refused" in caught.value.message
        # pods that did not ask are never sent (objectSelector): unaffected by the outage
        assert not injected(create_pod(kube, namespace, pod("unasked", labels={"walcar.io/inject": "false"})))
        set_local_hook(kube, failurePolicy="Ignore")
        settled(kube, namespace, admitted_plain, "failurePolicy Ignore to take effect")
        ignored = create_pod(kube, namespace, pod("ignore", WANTS))
        assert not injected(ignored) and containers(ignored) == ["web"]
    finally:
        set_local_hook(kube, failurePolicy="Fail")
        injector.start(trusting(ca, injector.workdir))
    settled(kube, namespace, admitted_injected, "the injector back with failurePolicy Fail")
    assert injected(create_pod(kube, namespace, pod("back", WANTS)))


# --- the chart's own webhook, clientConfig.service -----------------------------------------


def test_chart_service_webhook_fails_closed_without_endpoints(kube: Kube, namespace: str) -> None:
    """No injector pod ever gets ready here: Fail refuses the pod, fast, naming the Service (never a ClusterIP)."""
    helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values",
         "--set", "webhook.failurePolicy=Fail")
    try:
        settled(kube, namespace, refused, "the chart's webhook with failurePolicy Fail")
        with pytest.raises(KubeError) as caught:
            create_pod(kube, namespace, pod("closed", WANTS))
        message = caught.value.message
        assert caught.value.code == 500
        assert 'failed calling webhook "inject.walcar.io"' in message
        assert f'no endpoints available for service "{INJECTOR}"' in message, message
        assert "10.96." not in message  # --enable-aggregator-routing: endpoints, never the ClusterIP
    finally:
        helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values",
             "--set", "webhook.failurePolicy=Ignore")
    settled(kube, namespace, admitted_injected, "the chart's webhook back to Ignore")
    assert injected(create_pod(kube, namespace, pod("open", WANTS)))  # Ignore: the local copy injects


# --- upgrades and certificate rotation ---------------------------------------------------------


def secret_data(kube: Kube, name: str) -> dict[str, str]:
    return kube.get(f"/api/v1/namespaces/{RELEASE_NS}/secrets/{name}")["data"]


def chart_ca_bundle(kube: Kube) -> list[x509.Certificate]:
    config = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{INJECTOR}")
    return x509.load_pem_x509_certificates(base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]))


def pem(data: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(data))


def test_helm_upgrade_keeps_the_webhook_certificate_and_the_admin_token(kube: Kube, injector: InjectorProcess) -> None:
    tls, token = secret_data(kube, f"{INJECTOR}-tls"), secret_data(kube, ADMIN_TOKEN)
    bundle = chart_ca_bundle(kube)
    helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values",
         "--set", "sidecar.logLevel=debug")
    assert secret_data(kube, f"{INJECTOR}-tls") == tls
    assert secret_data(kube, ADMIN_TOKEN) == token
    assert chart_ca_bundle(kube) == bundle == [pem(tls["ca.crt"])]


def test_rotation_trusts_old_and_new_ca_until_the_next_rotation(kube: Kube, injector: InjectorProcess) -> None:
    """Delete the Secret, helm upgrade: the injector still serves the old certificate for a while."""
    old = secret_data(kube, f"{INJECTOR}-tls")
    kube.delete(f"/api/v1/namespaces/{RELEASE_NS}/secrets/{INJECTOR}-tls")
    helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values")
    new = secret_data(kube, f"{INJECTOR}-tls")
    assert new["ca.crt"] != old["ca.crt"] and new["tls.crt"] != old["tls.crt"]
    assert chart_ca_bundle(kube) == [pem(new["ca.crt"]), pem(old["ca.crt"])]
    assert new["ca-previous.crt"] == old["ca.crt"]
    for served in (old, new):  # whichever certificate the injector serves, the bundle holds its issuer
        issuer = pem(served["ca.crt"])
        assert issuer in chart_ca_bundle(kube)
        pem(served["tls.crt"]).verify_directly_issued_by(issuer)
    helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values")  # no rotation: kept
    assert chart_ca_bundle(kube) == [pem(new["ca.crt"]), pem(old["ca.crt"])]
    kube.delete(f"/api/v1/namespaces/{RELEASE_NS}/secrets/{INJECTOR}-tls")  # the next rotation drops the oldest
    helm("upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values")
    newest = secret_data(kube, f"{INJECTOR}-tls")
    assert chart_ca_bundle(kube) == [pem(newest["ca.crt"]), pem(new["ca.crt"])]


def test_two_ca_bundle_has_no_window_while_the_injector_reloads(kube: Kube, namespace: str,
                                                                injector: InjectorProcess, ca: Authority,
                                                                tmp_path: Path) -> None:
    """The mechanism the chart relies on, live: pods keep getting injected across the switch."""
    successor = make_ca("walcar-local-injector-ca-2")
    both = base64.b64encode(successor.pem() + ca.pem()).decode()
    set_local_hook(kube, clientConfig={**local_hook(kube)["webhooks"][0]["clientConfig"], "caBundle": both})
    try:
        time.sleep(2)  # the new bundle reaching admission (a watch); both trust the certificate served now
        assert injected(create_pod(kube, namespace, pod("before", WANTS)))  # old certificate, old CA
        issue(successor, injector.certfile, injector.keyfile)  # kubelet updating the mounted Secret
        for index in range(10):  # across the reload (every 200 ms here; 60 s in the chart)
            assert injected(create_pod(kube, namespace, pod(f"during-{index}", WANTS)))
        wait_until(lambda: "event=certificate_reloaded" in injector.log(), 10, what="the reload")
        assert injected(create_pod(kube, namespace, pod("after", WANTS)))  # new certificate, new CA
    finally:
        issue(ca, injector.certfile, injector.keyfile)
        set_local_hook(kube, clientConfig={**local_hook(kube)["webhooks"][0]["clientConfig"],
                                           "caBundle": base64.b64encode(ca.pem()).decode()})
        wait_until(lambda: injector.log().count("event=certificate_reloaded") >= 2, 10, what="the reload back")


# --- helm test ------------------------------------------------------------------------------


def test_helm_test_pod_is_admitted_in_the_restricted_namespace(kube: Kube, injector: InjectorProcess) -> None:
    """No kubelet runs it here (its command is tested in test_injector_tls); the API server must accept it."""
    result = helm("test", RELEASE, "--namespace", RELEASE_NS, "--timeout", "3s", check=False)
    assert result.returncode != 0  # it never completes without a kubelet
    created = kube.get(f"/api/v1/namespaces/{RELEASE_NS}/pods/{INJECTOR}-test")
    assert created["spec"]["containers"][0]["command"][:3] == ["walcar", "inject", "health"]
    assert created["metadata"]["annotations"]["helm.sh/hook"] == "test"
