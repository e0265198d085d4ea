"""The injector as it runs in the cluster: `walcar inject serve` over TLS, real HTTP client, real fixtures.

A throwaway CA and serving certificate are made here (cryptography); the client trusts
only that CA, the way the API server trusts the webhook's caBundle.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.pki import Authority, issue, make_ca, trusting
from tests.support.procs import free_port, wait_for
from tests.unit.test_inject import (
    CONTROL_PLANE,
    SETTINGS,
    admission_review,
    apply,
    body,
    deployment_pod,
    walcar_of,
)

ROOT = Path(__file__).resolve().parents[2]


# --- the injector process -----------------------------------------------------------------


class InjectorProcess:
    def __init__(self, workdir: Path, ca: Authority, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.certfile, self.keyfile = workdir / "tls.crt", workdir / "tls.key"
        issue(ca, self.certfile, self.keyfile)
        control_plane = workdir / "walcar.yaml"
        control_plane.write_text(yaml.safe_dump(CONTROL_PLANE))
        self.config = workdir / "injector.yaml"
        self.config.write_text(yaml.safe_dump({
            **SETTINGS,
            "bind": f"127.0.0.1:{self.port}",
            "cert_file": str(self.certfile),
            "key_file": str(self.keyfile),
            "control_plane": str(control_plane),
            **settings,
        }))
        self.log_path = workdir / "injector.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, verify: ssl.SSLContext) -> InjectorProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "inject", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"injector exited {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", verify=verify, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 20, interval=0.1, what="injector readiness")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_ca()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> Iterator[InjectorProcess]:
    workdir = tmp_path_factory.mktemp("injector")
    process = InjectorProcess(workdir, ca).start(trusting(ca, workdir))
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server: InjectorProcess, ca: Authority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, verify=trusting(ca, tmp_path_factory.mktemp("ca")), timeout=5.0) as c:
        yield c


def mutate(client: httpx.Client, payload: bytes) -> tuple[int, dict[str, Any]]:
    response = client.post("/mutate", content=payload, headers={"content-type": "application/json"})
    assert response.status_code != 500
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


# --- the fixtures over TLS -----------------------------------------------------------------


def test_deployment_pod_is_injected_over_tls(client: httpx.Client) -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/namespace": "sessions",
                          "walcar.io/protocols": "memcached,kv", "walcar.io/memory": "512Mi"})
    status, answer = mutate(client, body(admission_review(pod, uid="tls-1")))
    assert status == 200
    assert answer["response"]["uid"] == "tls-1"
    out = apply(pod, answer)
    walcar = out["spec"]["initContainers"][0]
    assert walcar["name"] == "walcar"
    assert walcar["restartPolicy"] == "Always"
    assert walcar["resources"]["limits"]["memory"] == "512Mi"
    assert [p["containerPort"] for p in walcar["ports"]] == [9901, 9902, 11211, 8080]  # admin, metrics, protocols
    assert out["spec"]["terminationGracePeriodSeconds"] == 37


def test_pod_with_init_containers_over_tls(client: httpx.Client) -> None:
    pod = deployment_pod({"walcar.io/inject": "true"}, initContainers=[{"name": "migrate", "image": "m:1"}])
    _, answer = mutate(client, body(admission_review(pod)))
    assert [c["name"] for c in apply(pod, answer)["spec"]["initContainers"]] == ["walcar", "migrate"]


def test_already_injected_and_not_annotated_pods_are_left_alone(client: httpx.Client) -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    _, answer = mutate(client, body(admission_review(pod)))
    injected = apply(pod, answer)
    assert walcar_of(injected)["name"] == "walcar"
    for unchanged in (injected, deployment_pod(None), deployment_pod({"walcar.io/inject": "false"})):
        status, answer = mutate(client, body(admission_review(unchanged, uid="same")))
        assert status == 200
        assert answer["response"] == {"uid": "same", "allowed": True}


def test_bad_annotation_is_denied_with_the_reason(client: httpx.Client) -> None:
    pod = deployment_pod({"walcar.io/inject": "true", "walcar.io/protocols": "redis"})
    status, answer = mutate(client, body(admission_review(pod, uid="bad")))
    assert status == 200
    assert answer["response"]["uid"] == "bad"
    assert answer["response"]["allowed"] is False
    assert "walcar.io/protocols: unknown protocol(s) 'redis'" in answer["response"]["status"]["message"]


def test_malformed_json_is_a_400_admission_review(client: httpx.Client) -> None:
    status, answer = mutate(client, b'{"apiVersion": "admission.k8s.io/v1", "request": {')
    assert status == 400
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["allowed"] is False
    assert "not JSON" in answer["response"]["status"]["message"]


@pytest.mark.parametrize("payload", [
    b"[]",
    b"{}",
    b'{"request": {"uid": "u", "kind": {"kind": "Pod"}, "object": 42}}',
    b'{"request": {"uid": "u", "kind": {"kind": "Pod"}, "object": {"spec": {"containers": {}}, '
    b'"metadata": {"annotations": {"walcar.io/inject": "true"}}}}}',
    "\"\u00e9\"".encode("utf-16"),  # not UTF-8 at all
])
def test_malformed_reviews_never_get_a_500(client: httpx.Client, payload: bytes) -> None:
    status, answer = mutate(client, payload)
    assert status in (200, 400)
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert "patch" not in response
    if status == 200:
        assert response["allowed"] is True
        assert response["warnings"]


def test_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/mutate").status_code == 405
    assert client.get("/nope").status_code == 404


def test_oversized_body_is_refused_without_a_500(client: httpx.Client) -> None:
    response = client.post("/mutate", content=b" " * (9 * 1024 * 1024))
    assert response.status_code == 413


def test_client_that_does_not_trust_the_ca_cannot_talk_to_it(server: InjectorProcess) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", verify=ssl.create_default_context(), timeout=2.0)


def test_health_command_of_the_helm_test_pod(server: InjectorProcess, ca: Authority, tmp_path: Path) -> None:
    """`walcar inject health` (the chart's `helm test` pod) trusts only the CA it is given."""

    def health(ca_file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sidecar.cli", "inject", "health", "--url",
                               f"{server.url}/healthz", "--ca-file", str(ca_file)],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)

    good, stranger = tmp_path / "ca.crt", tmp_path / "other.crt"
    good.write_bytes(ca.pem())
    stranger.write_bytes(make_ca("stranger").pem())
    ok = health(good)
    assert ok.returncode == 0, ok.stderr
    assert '200 {"status": "alive"}' in ok.stdout
    refused = health(stranger)
    assert refused.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr


def test_decisions_are_logged_structured(client: httpx.Client, server: InjectorProcess) -> None:
    pod = deployment_pod({"walcar.io/inject": "true"})
    mutate(client, body(admission_review(pod, uid="logged-uid")))

    def logged() -> bool:
        return any("event=admission" in line and "uid=logged-uid" in line for line in server.log().splitlines())

    wait_for(logged, 5, what="the admission log line")
    line = next(line for line in server.log().splitlines() if "uid=logged-uid" in line)
    assert "outcome=injected" in line
    assert "namespace=shop" in line
    assert "pod=web-7c9f8d6b5d-*" in line


# --- certificate rotation and shutdown ----------------------------------------------------


def test_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    old_ca, new_ca = make_ca("old-ca"), make_ca("new-ca")
    process = InjectorProcess(tmp_path, old_ca, cert_reload_interval="100ms").start(trusting(old_ca, tmp_path))
    try:
        pid = process.proc.pid if process.proc else None
        issue(new_ca, process.certfile, process.keyfile)  # what cert-manager / kubelet do to the mounted Secret
        new_trust = trusting(new_ca, tmp_path)

        def serves_new() -> bool:
            try:
                return httpx.get(f"{process.url}/healthz", verify=new_trust, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(serves_new, 10, interval=0.1, what="the rotated certificate")
        assert process.proc is not None and process.proc.pid == pid and process.proc.poll() is None
        pod = deployment_pod({"walcar.io/inject": "true"})
        response = httpx.post(f"{process.url}/mutate", content=body(admission_review(pod)), verify=new_trust)
        assert response.json()["response"]["allowed"] is True
        assert "event=certificate_reloaded" in process.log()
    finally:
        assert process.stop() == 0, process.log()


def test_sigterm_stops_it_promptly(tmp_path: Path) -> None:
    ca = make_ca()
    process = InjectorProcess(tmp_path, ca).start(trusting(ca, tmp_path))
    started = time.monotonic()
    assert process.stop() == 0
    assert time.monotonic() - started < 10
    assert "event=injector_stopped" in process.log()


def test_invalid_control_plane_refuses_to_start(tmp_path: Path) -> None:
    ca = make_ca()
    process = InjectorProcess(tmp_path, ca)
    (tmp_path / "walcar.yaml").write_text(json.dumps({"namespaces": {"orders": {"mode": "eventually"}}}))
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "inject", "serve", "--config", str(process.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert "namespaces.orders.mode: expected one of 'async', 'off', 'sync', got 'eventually'" in result.stderr
