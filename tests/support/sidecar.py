"""Run a real sidecar for a test: in-process (trio) or as a `walcar run` subprocess."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import tomli_w
import trio

from sidecar import config as config_mod
from sidecar.app import Sidecar
from tests.support.procs import free_port, wait_for

# Every secret a test hands a sidecar through secret_file(): no sidecar's log may ever contain one.
NEVER_LOGGED: set[str] = set()


def secret_file(path: Path, value: str) -> Path:
    """A token or password file for a sidecar, remembered so that every SidecarProcess's log is checked for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    NEVER_LOGGED.add(value)
    return path


def sidecar_document(nats_url: str, namespaces: dict[str, Any], listeners: list[dict[str, Any]] | None = None,
                     **sidecar: Any) -> dict[str, Any]:
    settings = {
        "nats_url": nats_url,
        "admin": f"127.0.0.1:{free_port()}",
        "shutdown_grace": "0s",
        "shutdown_deadline": "10s",
        **sidecar,
    }
    return {"sidecar": settings, "listeners": listeners or [], "namespaces": namespaces}


def kv_listener() -> dict[str, Any]:
    return {"protocol": "kv", "bind": f"127.0.0.1:{free_port()}"}


def build_config(document: dict[str, Any]) -> config_mod.Config:
    return config_mod.validate(document)


@asynccontextmanager
async def running_sidecar(config: config_mod.Config, role: str = "all") -> AsyncIterator[Sidecar]:
    async with trio.open_nursery() as nursery:
        sidecar: Sidecar = await nursery.start(Sidecar(config, role=role, connect_retry=5.0).run)  # type: ignore[arg-type]
        try:
            yield sidecar
        finally:
            sidecar.request_shutdown("test finished")


def base_url(config: config_mod.Config, protocol: str = "kv") -> str:
    listener = next(item for item in config.listeners if item.protocol == protocol)
    return f"http://{listener.bind}"


class SidecarProcess:
    """`walcar run` as a child process: killable, restartable, with its log captured."""

    def __init__(self, document: dict[str, Any], workdir: Path, role: str = "all", nofile: int | None = None) -> None:
        self.document = document
        self.nofile = nofile  # the child's open-file limit (ulimit -n), when a test squeezes it
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "walcar.toml"
        self.config_path.write_text(tomli_w.dumps(document))
        self.log_path = workdir / "walcar.log"
        self.role = role
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://{self.document['sidecar']['admin']}"

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> SidecarProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "run", "--config", str(self.config_path), "--role", self.role],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Not the caller's directory: `-m` puts the working directory first on sys.path, and
                # from a checkout it would shadow a PYTHONPATH meant to run another version.
                cwd=self.workdir,
                preexec_fn=self._limit if self.nofile is not None else None,
            )
        if wait_ready:
            try:
                wait_for(self.ready, timeout, interval=0.1, what="sidecar readiness")
            except TimeoutError:
                raise RuntimeError(f"sidecar did not become ready:\n{self.log()[-4000:]}") from None
        return self

    def _limit(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, hard))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        """The process's resident memory now, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{self.admin}/readyz", timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def target_status(self, target: str) -> dict[str, Any]:
        """This sidecar's row for `target` in `GET /v1/drain` (backlog, state, owned_here, ...)."""
        with urllib.request.urlopen(f"{self.admin}/v1/drain", timeout=10) as resp:
            rows = json.load(resp)["targets"]
        found = [row for row in rows if row["target"] == target]
        assert found, f"no status row for target {target!r} at {self.admin}: {rows}"
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        text = self.log()
        leaked = [secret[:6] + "..." for secret in NEVER_LOGGED if secret in text]
        assert not leaked, f"secrets in the sidecar's log {self.log_path}: {leaked}"
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)
