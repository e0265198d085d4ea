"""Operator commands against a running sidecar's admin endpoint.

    walcar status [--json] [--watch SECONDS]
    walcar dlq ls NS | show NS SEQ | replay NS | purge NS   [--target T] [--seq A-B] [--key GLOB]
    walcar drain --wait                  (a preStop hook: graceful shutdown, then wait for exit)

Every command takes `--admin HOST:PORT` or `--config FILE` (to read `sidecar.admin`
and the admin token file from it; default: $WALCAR_CONFIG, which the chart sets in
walcar's containers, so `kubectl exec ... -c walcar -- walcar dlq ls NS` just works).
Errors name what is wrong and exit non-zero: 1 when the sidecar answered with an
error, 2 when it cannot be reached or the arguments are wrong. No tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sidecar import config as config_mod
from sidecar.progress import Progress
from sidecar.secrets import SecretFileError, read_token_file

DEFAULT_ADMIN = "127.0.0.1:9901"
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, address: str, token: str | None, timeout: float = 10.0) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.address}{path}", data=data, method=method)
        request.add_header("content-type", "application/json")
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise CliError(f"admin at {self.address} answered {exc.code}: {detail or exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            text = getattr(reason, "strerror", None) or str(reason)
            raise CliError(f"cannot reach admin at {self.address}: {text.lower()}", EXIT_UNREACHABLE) from None


def client_from(args: argparse.Namespace) -> AdminClient:
    address, token_file = DEFAULT_ADMIN, None
    config_path = args.config or (None if args.admin else os.environ.get("WALCAR_CONFIG"))
    if config_path:
        try:
            cfg = config_mod.load(config_path)
        except config_mod.ConfigError as exc:
            raise CliError(f"{config_path}: {exc.errors[0]}", EXIT_UNREACHABLE) from None
        address, token_file = cfg.sidecar.admin, cfg.sidecar.admin_token_file
    if args.admin:
        address = args.admin
    if args.token_file:
        token_file = args.token_file
    try:
        token = read_token_file(token_file) if token_file else None
    except SecretFileError as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    return AdminClient(address, token)


# --- formatting ---------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds / 3600:.0f}h{seconds % 3600 / 60:02.0f}m"


def status_table(targets: list[dict[str, Any]]) -> str:
    rows = [[t["namespace"], t["target"], t["type"], str(t["backlog"]), age(t["oldest_age_s"]),
             f"{t['rate']:.0f}/s", t["state"], str(t["dlq"]), (t.get("last_error") or "")[:60]] for t in targets]
    return table(["NAMESPACE", "TARGET", "TYPE", "BACKLOG", "OLDEST", "RATE", "STATE", "DLQ", "LAST ERROR"], rows)


def replays_table(jobs: list[dict[str, Any]]) -> str:
    rows = [[j["id"], j["namespace"], j["target"], j["state"],
             f"{j.get('position', 0):,}/{j.get('to_seq', 0):,}", str(j.get("applied", 0)), str(j.get("failed", 0)),
             f"{j.get('rate', 0):.0f}/s", age(j["eta_s"]) if j.get("eta_s") else "-"] for j in jobs]
    return table(["REPLAY", "NAMESPACE", "TARGET", "STATE", "POSITION", "APPLIED", "FAILED", "RATE", "ETA"], rows)


def letters_table(letters: list[dict[str, Any]]) -> str:
    rows = [[str(d["seq"]), d["time"][:19].replace("T", " "), d["target"], d["key"][:40], d["error_class"],
             str(d["attempts"]), "yes" if d["superseded"] else "no", d["error"][:60]] for d in letters]
    return table(["SEQ", "TIME", "TARGET", "KEY", "CLASS", "ATTEMPTS", "SUPERSEDED", "ERROR"], rows)


# --- commands -------------------------------------------------------------------------


def config_line(config: dict[str, Any]) -> str:
    """Where each namespace comes from: `config: orders (bucket r3), sessions (file)`, and staleness."""
    parts = [f"{row['namespace']} ({row['source']}{' r' + str(row['revision']) if row['revision'] else ''})"
             for row in config.get("namespaces", [])]
    line = "config: " + (", ".join(parts) or "no namespaces")
    if config.get("stale_since"):
        line += f"; stale since {config['stale_since']} (namespace bucket unreachable)"
    if config.get("apply_errors"):
        line += f"; {config['apply_errors']} refused or failed change(s), see the log"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    client = client_from(args)
    while True:
        reply = client.call("GET", "/v1/drain")
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            if args.watch:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(status_table(reply["targets"]))
            if reply.get("replays"):
                print()
                print(replays_table(reply["replays"]))
            if reply.get("config"):
                print()
                print(config_line(reply["config"]))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def _filter(args: argparse.Namespace) -> dict[str, Any]:
    flt: dict[str, Any] = {}
    if args.target:
        flt["target"] = args.target
    if args.key:
        flt["key"] = args.key
    if args.seq:
        low, _, high = args.seq.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise CliError(f"--seq takes A-B or A, got {args.seq!r}", EXIT_UNREACHABLE)
        flt["seq_from"], flt["seq_to"] = int(low), int(high or low)
    return flt


def _selection(client: AdminClient, namespace: str, flt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dead letter the filter selects, page by page."""
    selected: list[dict[str, Any]] = []
    after = max(0, flt.get("seq_from", 1) - 1)
    while True:
        query = f"after={after}&limit=500"
        if flt.get("target"):
            query += f"&target={flt['target']}"
        if flt.get("key"):
            query += f"&key={urllib.parse.quote(flt['key'])}"
        page = client.call("GET", f"/v1/dlq/{namespace}?{query}")
        for letter in page["dead_letters"]:
            if flt.get("seq_to") and letter["seq"] > flt["seq_to"]:
                return selected
            selected.append(letter)
        if page["next_after"] is None:
            return selected
        after = page["next_after"]


def cmd_dlq(args: argparse.Namespace) -> int:
    client = client_from(args)
    namespace = args.namespace
    if args.dlq_command == "show":
        letter = client.call("GET", f"/v1/dlq/{namespace}/{args.seq_number}")
        if args.json:
            print(json.dumps(letter, indent=2))
            return 0
        print(table(["FIELD", "VALUE"], [[k, str(v)] for k, v in letter["headers"].items()]))
        print("\nentry:")
        print(json.dumps(letter["entry"], indent=2, default=str))
        return 0
    flt = _filter(args)
    letters = _selection(client, namespace, flt)
    if args.dlq_command == "ls":
        print(json.dumps(letters, indent=2) if args.json else letters_table(letters))
        return 0
    action = args.dlq_command
    summary: dict[str, list[Any]] = {"replayed": [], "skipped": [], "failed": [], "purged": []}
    progress = Progress(f"dlq {action}", total=len(letters))
    for start in range(0, len(letters), 50):
        chunk = [d["seq"] for d in letters[start : start + 50]]
        body: dict[str, Any] = {"seqs": chunk, "target": flt.get("target")}
        if action == "replay":
            body["include_superseded"] = args.include_superseded
        reply = client.call("POST", f"/v1/dlq/{namespace}/{action}", body)
        for key, values in reply.items():
            summary[key].extend(values)
        progress.advance(len(chunk))
    progress.finish()
    if args.json:
        print(json.dumps(summary, indent=2))
    elif action == "replay":
        print(f"replayed {len(summary['replayed'])}, skipped {len(summary['skipped'])} (superseded), "
              f"failed {len(summary['failed'])}")
        for failure in summary["failed"]:
            print(f"  seq {failure['seq']}: {failure['error']}")
    else:
        print(f"purged {len(summary['purged'])}")
    return 1 if summary["failed"] else 0


def cmd_drain(args: argparse.Namespace) -> int:
    client = client_from(args)
    if not args.wait:
        raise CliError("`walcar drain` needs --wait (the only mode: shut down gracefully and wait)", EXIT_UNREACHABLE)
    reply = client.call("POST", "/v1/shutdown")
    deadline = time.monotonic() + (args.timeout or float(reply.get("deadline_s", 30)) + 5)
    print(f"draining sidecar at {client.address} (deadline {reply.get('deadline_s')}s)", file=sys.stderr)
    probe = AdminClient(client.address, None, timeout=1.0)
    while time.monotonic() < deadline:
        try:
            probe.call("GET", "/healthz")
        except CliError as exc:
            if exc.code == EXIT_UNREACHABLE:
                print("sidecar stopped", file=sys.stderr)
                return 0
        time.sleep(0.2)
    raise CliError(f"sidecar at {client.address} still running after the deadline")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", metavar="HOST:PORT", help=f"admin address (default {DEFAULT_ADMIN})")
    parser.add_argument("--config", "-c", help="read the admin address and token file from this config")
    parser.add_argument("--token-file", help="the admin bearer token (mutations, DLQ and config reads)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="drain status per namespace/target")
    _common(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    status.set_defaults(func=cmd_status)

    dlq = sub.add_parser("dlq", help="dead letters: ls, show, replay, purge")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (("ls", "list dead letters"), ("replay", "re-journal dead letters to their target"),
                       ("purge", "delete dead letters")):
        cmd = dlq_sub.add_parser(name, help=text)
        _common(cmd)
        cmd.add_argument("namespace")
        cmd.add_argument("--target")
        cmd.add_argument("--seq", metavar="A-B", help="DLQ sequence range")
        cmd.add_argument("--key", metavar="GLOB")
        cmd.add_argument("--json", action="store_true")
        if name == "replay":
            cmd.add_argument("--include-superseded", action="store_true",
                             help="also replay letters whose key was written again since (overwrites newer values)")
        cmd.set_defaults(func=cmd_dlq)
    show = dlq_sub.add_parser("show", help="one dead letter, whole")
    _common(show)
    show.add_argument("namespace")
    show.add_argument("seq_number", type=int, metavar="SEQ")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_dlq)

    drain = sub.add_parser("drain", help="graceful shutdown of a running sidecar (preStop hook)")
    _common(drain)
    drain.add_argument("--wait", action="store_true", help="wait until the sidecar has exited")
    drain.add_argument("--timeout", type=float, help="seconds to wait (default: its shutdown deadline + 5)")
    drain.set_defaults(func=cmd_drain)
