"""Private server processes for tests that stop, kill or restart a service.

Fault tests never touch the shared services: each gets its own nats-server or
memcached on a free port, and can stop and restart it on the same port and store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support.services import NATS_SERVER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A server process the test owns: start, stop (SIGTERM), kill (SIGKILL), restart."""

    name = "process"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return port_open(self.port)

    def start(self, timeout: float = 15.0) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            wait_for(self.ready, timeout, what=f"{self.name} on port {self.port}")
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not start:\n{self.logfile.read_text()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        wait_for(lambda: not port_open(self.port), 10, what=f"{self.name} port {self.port} to close")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsProcess(ManagedProcess):
    name = "nats-server"

    def __init__(self, workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(workdir, port)
        self.monitor_port = free_port()
        self.extra_args = list(extra_args)  # e.g. ["--user", "u", "--pass", "p"]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            "-js", "-sd", str(self.workdir / "js"), *self.extra_args,
        ]

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False


class MemcachedProcess(ManagedProcess):
    name = "memcached"

    def command(self) -> list[str]:
        command = [shutil.which("memcached") or "memcached", "-l", "127.0.0.1", "-p", str(self.port),
                   "-U", "0", "-m", "128"]
        # memcached refuses to run as root unless told which user to stay.
        return [*command, "-u", "root"] if os.geteuid() == 0 else command


class DebianNatsProcess(NatsProcess):
    """Debian's packaged nats-server (2.9.x): too old for walcar, kept to prove the refusal."""

    name = "debian-nats-server"

    def command(self) -> list[str]:
        return ["/usr/sbin/nats-server", *super().command()[1:]]


def services_module():
    """scripts/services (a Python script without a .py suffix), imported once."""
    import importlib.util
    import sys
    from importlib.machinery import SourceFileLoader

    from tests.support.services import SCRIPT

    module = sys.modules.get("walcar_services")
    if module is None:
        loader = SourceFileLoader("walcar_services", str(SCRIPT))
        spec = importlib.util.spec_from_loader("walcar_services", loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["walcar_services"] = module
        loader.exec_module(module)
    return module


class CassandraProcess(ManagedProcess):
    """A Cassandra node of the test's own (same cached jars, own ports and data): stop it, start it again."""

    name = "cassandra"

    def __init__(self, workdir: Path, port: int | None = None, extra_yaml: str = "",
                 ready_context: ssl.SSLContext | None = None) -> None:
        super().__init__(workdir, port)
        self.storage_port = free_port()
        self.jmx_port = free_port()
        self._services = services_module()
        self.extra_yaml = extra_yaml  # e.g. client_encryption_options (TLS-only native transport)
        self.ready_context = ready_context  # how the readiness probe speaks TLS to it

    def command(self) -> list[str]:
        return self._services.cassandra_command(self.workdir, self.port, self.storage_port, self.jmx_port,
                                                self.extra_yaml)

    def ready(self) -> bool:
        try:
            return self._services.cql_release_version(self.port, self.ready_context) is not None
        except OSError:
            return False

    def start(self, timeout: float = 180.0) -> None:
        super().start(timeout)


class KafkaProcess(ManagedProcess):
    """A Kafka broker (KRaft, broker + controller) of the test's own: stop it, start it again on the same data."""

    name = "kafka"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.controller_port = free_port()
        self._services = services_module()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return self._services.kafka_command(self.workdir, self.port, self.controller_port)

    def ready(self) -> bool:
        return self._services.kafka_ready(self.port)

    def start(self, timeout: float = 90.0) -> None:
        super().start(timeout)
