"""`walcar inject ...`: run the webhook, and the postStart helper of non-native sidecars.

    walcar inject serve --config injector.yaml
    walcar inject wait-ready [--url http://127.0.0.1:9901/readyz] [--timeout 120]
    walcar inject health --url https://walcar-injector.walcar-system.svc/healthz --ca-file ca.crt

Kept out of sidecar/cli.py (which only registers the group) so the injector's
imports (hypercorn, trio) load only when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from sidecar import config as config_mod
    from sidecar import logs
    from sidecar.inject import render, server
    from sidecar.inject.patch import Injector
    from sidecar.inject.settings import SettingsError, load

    try:
        settings = load(args.config)
    except SettingsError as exc:
        print(f"walcar inject: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        control_plane = render.load_control_plane(settings.control_plane)
    except config_mod.ConfigError as exc:
        print(f"walcar inject: control plane {settings.control_plane}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level)
    injector = Injector(settings, control_plane)

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            await server.serve(settings, injector, shutdown)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except OSError as exc:  # the port could not be bound, the certificate could not be read
        print(f"walcar inject: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _watch_signals(shutdown: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            shutdown.set()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cmd_wait_ready(args: argparse.Namespace) -> int:
    """postStart of a non-native sidecar: kubelet holds the app's start until this returns."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _ready(args.url):
            return EXIT_OK
        time.sleep(args.interval)
    print(f"walcar: {args.url} not ready after {args.timeout:g}s", file=sys.stderr)
    return EXIT_FAILURE


def cmd_health(args: argparse.Namespace) -> int:
    """`helm test`: the injector's health over TLS, trusting only the webhook's CA (as the API server does)."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=args.ca_file)
    except (OSError, ssl.SSLError) as exc:
        print(f"walcar: cannot read the CA {args.ca_file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as response:
            status, text = response.status, response.read(200).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.reason
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"walcar: {args.url}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.url}: {status} {text}")
    return EXIT_OK if status == 200 else EXIT_FAILURE


def add_parser(sub: Any) -> None:
    """Register `walcar inject` on the main parser's subcommands."""
    inject = sub.add_parser("inject", help="the Kubernetes sidecar injector")
    inject_sub = inject.add_subparsers(dest="inject_command", required=True)

    serve = inject_sub.add_parser("serve", help="serve the mutating admission webhook")
    serve.add_argument("--config", "-c", required=True, help="injector settings (YAML); see docs/kubernetes.md")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(func=cmd_serve)

    wait = inject_sub.add_parser("wait-ready", help="wait until the sidecar's /readyz answers 200 (postStart)")
    wait.add_argument("--url", default="http://127.0.0.1:9901/readyz")
    wait.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    wait.add_argument("--interval", type=float, default=0.2, metavar="SECONDS")
    wait.set_defaults(func=cmd_wait_ready)

    health = inject_sub.add_parser("health", help="check the injector's /healthz over TLS (helm test)")
    health.add_argument("--url", required=True)
    health.add_argument("--ca-file", required=True, help="the CA the webhook's caBundle holds")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    health.set_defaults(func=cmd_health)
