"""The memcached front's memory under half-sent large values (issue 18).

N connections each send a `set` header for a V-byte value and half of the value, then stop
(a slow or hostile client). The sidecar's RSS is read from /proc before and while they hang
there, once with the listener's default `partial_budget` and once with a budget so large it
never binds (what every connection could buffer before the budget existed). The memcached
target is configured like `memcached -I 16m`, so the values are legal.

    python bench/fronts/run.py [--connections 60] [--value-mb 14] [--record]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import delete_streams, free_port, machine, report, start_walcar, table
from sidecar.config import Listener
from tests.support.services import ensure_up
from tests.support.sidecar import sidecar_document

UNBOUNDED = "64GiB"


def half_sent(port: int, namespace: str, connections: int, value: int) -> list[socket.socket]:
    """Each connection inside a `value`-byte set, half of it sent (as much as the sidecar takes)."""
    socks = []
    for n in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        socks.append(sock)
        pending = memoryview(b"set %s-%d 0 0 %d\r\n" % (namespace.encode(), n, value) + b"v" * (value // 2))
        deadline = time.monotonic() + 1.0
        while pending and time.monotonic() < deadline:
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                time.sleep(0.01)
    return socks


def run(services: object, budget: str, connections: int, value: int, hold: float) -> tuple[float, float, int]:
    """(baseline RSS, peak RSS, connections answered `out of memory`) of one walcar."""
    namespace = f"f{uuid.uuid4().hex[:8]}"
    host, port = services.memcached  # type: ignore[attr-defined]
    listen = free_port()
    document = sidecar_document(
        services.nats_url,  # type: ignore[attr-defined]
        {namespace: {"partitions": 2, "targets": [{"name": "cache", "type": "memcached",
                                                   "servers": [f"{host}:{port}"], "max_item_size": "16MiB"}]}},
        [{"protocol": "memcached", "bind": f"127.0.0.1:{listen}", "namespace": namespace,
          "partial_budget": budget}],
        log_level="warning",
    )
    workdir = Path(f"/tmp/walcar-bench-fronts-{namespace}")
    walcar = start_walcar(workdir, document)
    socks: list[socket.socket] = []
    try:
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as sock:  # warm the path
            sock.sendall(b"set %s-warm 0 0 1\r\nx\r\n" % namespace.encode())
            sock.recv(100)
        baseline = walcar.rss_mib()
        socks = half_sent(listen, namespace, connections, value)
        peak, refused = baseline, 0
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            peak = max(peak, walcar.rss_mib())
            for sock in socks:
                try:
                    refused += sock.recv(4096).count(b"out of memory")
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.2)
        return baseline, max(peak, walcar.rss_mib()), refused
    finally:
        for sock in socks:
            sock.close()
        walcar.stop()
        delete_streams(services.nats_url, namespace)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--value-mb", type=float, default=14.0)
    parser.add_argument("--hold", type=float, default=6.0, help="seconds to sample RSS while they hang")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    services = ensure_up()
    value = int(args.value_mb * 1000 * 1000)
    default = str(Listener(protocol="memcached", bind="127.0.0.1:0").partial_budget)
    rows = []
    for label, budget in ((f"{default} (default)", default), ("unbounded (before)", UNBOUNDED)):
        baseline, peak, refused = run(services, budget, args.connections, value, args.hold)
        rows.append([label, f"{baseline:.0f} MiB", f"{peak:.0f} MiB", f"+{peak - baseline:.0f} MiB",
                     f"{refused} of {args.connections}"])
        print(table(["partial_budget", "RSS idle", "RSS peak", "growth", "answered out of memory"], rows),
              flush=True)
    result = table(["partial_budget", "RSS idle", "RSS peak", "growth", "answered out of memory"], rows)
    command = f"python bench/fronts/run.py --connections {args.connections} --value-mb {args.value_mb:g}"
    report("memcached front under half-sent values",
           f"`{command}` — {machine()}; {args.connections} connections each inside a "
           f"{args.value_mb:g} MB `set` with half the value sent, held {args.hold:g} s; RSS of the walcar process "
           f"from /proc (ingress role, the memcached target configured with max_item_size 16MiB).\n\n{result}\n",
           args.record)


if __name__ == "__main__":
    main()
