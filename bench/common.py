"""Shared bits of walcar's benchmarks: numbers (percentiles, a results table, CPU time), processes (free ports,
a real `walcar run`, stopping), clean-up of what a run leaves on the shared services, and recording into
docs/benchmarks.md. Every script under bench/ uses these rather than its own copy."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import stream_name
from tests.support.procs import free_port
from tests.support.sidecar import SidecarProcess, sidecar_document

if TYPE_CHECKING:
    from cassandra.cluster import Cluster

__all__ = [
    "CASSANDRA_PASSWORD_FILE", "DOCS", "ROOT", "SidecarProcess", "cassandra_cluster", "cpu_seconds",
    "delete_streams", "drop_keyspace", "free_port", "machine", "median", "percentile", "pids_listening", "record",
    "report",
    "sidecar_document", "start_walcar", "stop", "table", "wait_port",
]

ROOT = Path(__file__).resolve().parents[1]  # scripts put it on sys.path before importing bench.common
DOCS = ROOT / "docs" / "benchmarks.md"
CASSANDRA_PASSWORD_FILE = ROOT / "examples" / "cassandra.password"


# --------------------------------------------------------------------------- numbers


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` (0.5 for the median, 0.99 for p99) of `values` lie; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


@contextlib.contextmanager
def client_gc_off() -> Iterator[None]:
    """Keep the latency client's own cyclic GC out of what it times.

    A collection in the client delays every request in flight, and more are in flight against
    the slower server, so its pauses would inflate the slower side's tail more than the other's.
    The servers' GC is untouched."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    return f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, {date.today().isoformat()}"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by these processes (all their threads); gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)
    return total / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- processes


def pids_listening(port: int) -> list[int]:
    """Processes with a listening TCP socket on `port` (to account for the shared memcached's CPU)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            pids.append(int(proc.name))
    return pids


def idle_seconds() -> float:
    """Idle + iowait CPU time of the whole box so far, summed over its CPUs (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:`port`; fails early if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_walcar(workdir: Path, document: dict[str, Any], role: str = "ingress",
                 wait_ready: bool = True) -> SidecarProcess:
    """A real `python -m sidecar.cli run --config workdir/walcar.toml --role ROLE` on `document` (see
    `sidecar_document`), its output in workdir/walcar.log; returns once /readyz answers (journal connected,
    every listener bound), or at once without `wait_ready`. Stop it with `.stop()` (SIGTERM, then SIGKILL);
    its pid is `.proc.pid`."""
    walcar = SidecarProcess(document, workdir, role=role)
    try:
        return walcar.start(wait_ready=wait_ready)
    except RuntimeError:
        walcar.stop()
        raise


# --------------------------------------------------------------------------- clean-up


def delete_streams(nats_url: str, namespace: str) -> None:
    """Delete a namespace's journal stream, its DLQ and its chunk store; best effort (say what is left behind).
    Runs its own asyncio loop: from trio, call it through trio.to_thread.run_sync."""
    import nats

    async def run() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for name in (stream_name(namespace), f"{stream_name(namespace)}_DLQ", f"OBJ_walchunks_{namespace}"):
                try:
                    await js.delete_stream(name)
                except Exception:  # not there: nothing to clean
                    pass
        finally:
            await nc.close()

    try:
        asyncio.run(run())
    except Exception as exc:  # the bench result stands
        print(f"note: could not delete the streams of {namespace}: {exc}", file=sys.stderr)


def cassandra_cluster(port: int, host: str = "127.0.0.1", **options: Any) -> Cluster:
    """A cassandra-driver Cluster (protocol v4, the services' credentials); `options` go to Cluster."""
    from tests.support.cassandra import driver_cluster

    return driver_cluster(port, host, **options)


def drop_keyspace(port: int, keyspace: str, host: str = "127.0.0.1") -> None:
    cluster = cassandra_cluster(port, host)
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------- docs/benchmarks.md


def record(section: str, body: str) -> None:
    """Replace (or append) `## <section>` in docs/benchmarks.md with `body`, and say so."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nMeasured by the scripts under `bench/`; " \
        "each prints ratios against a baseline run in the same invocation.\n"
    heading = f"## {section}"
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    # A function, not a string, as the replacement: a body's backslashes are not escapes.
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    DOCS.write_text(text.rstrip("\n") + "\n")
    print(f"recorded in {DOCS.relative_to(ROOT)}")


def report(section: str, body: str, record_it: bool) -> None:
    """Print `## <section>` and its body; with `record_it` (a script's --record), record them too."""
    print(f"\n## {section}\n\n{body}")
    if record_it:
        record(section, body)
