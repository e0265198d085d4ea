"""The test API server (scripts/services up k8s) and a small REST client for it.

Tests talk to the API server's REST API directly (httpx, the admin token from the run
directory), so what they assert is what any client, kubectl included, would see.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.services import CACHE, SCRIPT

RUN = Path(os.environ.get("WALCAR_RUN", CACHE / "run"))
APISERVER_DIR = RUN / "kube-apiserver"
KUBECONFIG = APISERVER_DIR / "kubeconfig"
K8S_SERVICES = ("etcd", "kube-apiserver", "kube-controller-manager")


class KubeError(Exception):
    """The API server answered an error status; `status` is its Status object."""

    def __init__(self, code: int, status: dict[str, Any]) -> None:
        self.code = code
        self.status = status
        super().__init__(f"{code}: {status.get('message', status)}")

    @property
    def message(self) -> str:
        return str(self.status.get("message", ""))


def ensure_k8s() -> Kube:
    """Start etcd, kube-apiserver and kube-controller-manager unless they answer (the first run builds them)."""
    status = subprocess.run([sys.executable, str(SCRIPT), "status", "--json"], capture_output=True, text=True)
    rows = {row["service"]: row["state"] for row in json.loads(status.stdout or "[]")}
    if any(rows.get(name) != "up" for name in K8S_SERVICES):
        proc = subprocess.run([sys.executable, str(SCRIPT), "up", "k8s"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/services up k8s failed:\n{proc.stdout}\n{proc.stderr}")
    config = json.loads(KUBECONFIG.read_text())
    cluster = config["clusters"][0]["cluster"]
    return Kube(cluster["server"], config["users"][0]["user"]["token"], cluster["certificate-authority"])


class Kube:
    def __init__(self, server: str, token: str, ca_file: str) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server, verify=ssl.create_default_context(cafile=ca_file), timeout=30.0,
                                 headers={"Authorization": f"Bearer {token}"})
        self.last_warnings: list[str] = []

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                params: dict[str, str] | None = None) -> dict[str, Any]:
        content = None if body is None else json.dumps(body).encode()
        response = self.http.request(method, path, content=content, params=params,
                                     headers={"Content-Type": content_type})
        # admission warnings come back as `Warning: 299 - "text"` headers (kubectl prints them)
        self.last_warnings = [value.split(" - ", 1)[-1].strip('"')
                              for value in response.headers.get_list("warning")]
        document = response.json() if response.content else {}
        if response.status_code >= 400:
            raise KubeError(response.status_code, document)
        return document

    def get(self, path: str, **params: str) -> dict[str, Any]:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        return self.request("POST", path, body, params={"dryRun": "All"} if dry_run else None)

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except KubeError as exc:
            if exc.code != 404:
                raise

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def create_namespace(self, name: str, labels: dict[str, str]) -> None:
        """A fresh namespace: one left by an interrupted run is deleted first (the namespace controller empties it)."""
        path = f"/api/v1/namespaces/{name}"
        if self.exists(path):
            self.delete(path)
            wait_until(lambda: not self.exists(path), 60, what=f"namespace {name} to go")
        self.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": name, "labels": labels}})
        # pods need the namespace's `default` ServiceAccount (kube-controller-manager makes it)
        wait_until(lambda: self.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
                   what=f"the default ServiceAccount in {name}")

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except KubeError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else {}
        return self.get(f"/api/v1/namespaces/{namespace}/pods", **params)["items"]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """The predicate's first truthy value, or TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
