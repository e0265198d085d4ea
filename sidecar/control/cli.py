"""`walcar ns`: namespaces in the control plane's bucket, applied live to every sidecar.

    walcar ns apply -f FILE [--dry-run]     validate, show the diff, write (optimistic concurrency)
    walcar ns ls | get NAME | history NAME
    walcar ns rollback NAME --to REV
    walcar ns rm NAME [--force]             refused while the namespace has un-applied entries

FILE holds `[namespaces.NAME]` tables, as the config file does. The NATS connection
comes from `--config` (or $WALCAR_CONFIG): its sidecar.nats_url and credentials.
Exit codes: 0 done, 1 refused (invalid, unsafe, changed meanwhile, un-applied entries),
2 the file, the config or NATS could not be read.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from sidecar import config as config_mod
from sidecar.config import Config, Namespace
from sidecar.control.store import (
    ControlError,
    NamespaceStore,
    Stored,
    now_rfc3339,
    stamp_now,
    to_document,
    unsafe_changes,
    validate_namespace,
)

EXIT_REFUSED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("WALCAR_CONFIG")
    if not path:
        raise UsageError("name the config whose NATS to use: --config FILE (or $WALCAR_CONFIG)")
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise UsageError(f"{path}: {exc.errors[0]}") from None


def _as_json(ns: Namespace | dict[str, Any] | None) -> list[str]:
    if ns is None:
        return []
    data = to_document(ns) if isinstance(ns, Namespace) else ns
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode().splitlines()


def _diff(name: str, before: Namespace | dict[str, Any] | None, after: Namespace | dict[str, Any] | None,
          old_label: str, new_label: str) -> str:
    lines = difflib.unified_diff(_as_json(before), _as_json(after), f"{name}@{old_label}", f"{name}@{new_label}",
                                 lineterm="")
    return "\n".join(lines)


def _read_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        document = config_mod.parse_document(file.read_text(), config_mod.format_of(file))
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except config_mod.ConfigError as exc:
        raise UsageError(exc.errors[0]) from None
    except Exception as exc:  # TOML/YAML syntax
        raise UsageError(f"{path}: {exc}") from None
    namespaces = document.get("namespaces") if isinstance(document, dict) else None
    if not isinstance(namespaces, dict) or not namespaces:
        raise UsageError(f"{path}: no [namespaces.NAME] tables")
    return namespaces


async def _apply_one(store: NamespaceStore, name: str, ns: Namespace, dry_run: bool, out: list[str]) -> None:
    current = await store.get(name)
    live = current.ns if current is not None else None
    problems = unsafe_changes(name, live, ns, await store.stream_info(name))
    if problems:
        raise ControlError(f"{name}: cannot apply live:\n  " + "\n  ".join(problems))
    expected = current.revision if current is not None and current.doc is not None else 0
    diff = _diff(name, current.doc.namespace if current is not None and current.doc else None, ns,
                 str(expected), "new")
    if not diff:
        out.append(f"{name}: unchanged (revision {expected})")
        return
    out.append(diff)
    if dry_run:
        out.append(f"{name}: dry run, nothing written")
        return
    revision = await store.put(name, ns, expected)
    out.append(f"{name}: applied as revision {revision}")


async def cmd_apply(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    at = now_rfc3339()
    wanted = {name: validate_namespace(name, stamp_now(raw, at) if isinstance(raw, dict) else raw)
              for name, raw in _read_file(args.file).items()}
    for name, ns in wanted.items():
        await _apply_one(store, name, ns, args.dry_run, out)


async def cmd_ls(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    out.append(f"{'NAMESPACE':<24} {'REVISION':>8}  {'APPLIED AT':<20}  {'BY':<24}  TARGETS")
    for stored in await store.latest():
        if stored.doc is None:
            continue
        name = stored.name
        targets = ",".join(t.name for t in stored.ns.targets) if stored.ns else f"INVALID: {stored.error}"
        out.append(f"{name:<24} {stored.revision:>8}  {stored.doc.applied_at:<20}  {stored.doc.applied_by:<24}  "
                   f"{targets}")


async def cmd_get(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    stored = await store.get(args.name)
    if stored is None or stored.doc is None:
        raise ControlError(f"{args.name}: not in the bucket (a namespace only in a sidecar's file is not shown)")
    document = {"namespaces": {args.name: stored.doc.namespace}}
    if args.format == "json":
        out.append(msgspec.json.format(msgspec.json.encode(document), indent=2).decode())
    else:
        out.append(f"# {args.name} revision {stored.revision}, applied {stored.doc.applied_at} "
                   f"by {stored.doc.applied_by}")
        out.append(msgspec.toml.encode(config_mod.drop_none(document)).decode())


async def cmd_history(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    revisions = await store.history(args.name)
    if not revisions:
        raise ControlError(f"{args.name}: no history in the bucket")
    before: Stored | None = None
    for stored in revisions:
        if stored.doc is None:
            out.append(f"revision {stored.revision}: removed")
        else:
            note = f"  INVALID: {stored.error}" if stored.error else ""
            out.append(f"revision {stored.revision}: applied {stored.doc.applied_at} by {stored.doc.applied_by}{note}")
            old = before.doc.namespace if before is not None and before.doc is not None else None
            diff = _diff(args.name, old, stored.doc.namespace, str(before.revision if before else 0),
                         str(stored.revision))
            out.extend("    " + line for line in diff.splitlines())
        before = stored


async def cmd_rollback(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    found = next((s for s in await store.history(args.name) if s.revision == args.to), None)
    if found is None or found.ns is None:
        raise ControlError(f"{args.name}: revision {args.to} is not a valid namespace in the bucket's history "
                           "(see `walcar ns history`)")
    await _apply_one(store, args.name, found.ns, False, out)


async def cmd_rm(store: NamespaceStore, args: argparse.Namespace, out: list[str]) -> None:
    current = await store.get(args.name)
    if current is None or current.doc is None:
        raise ControlError(f"{args.name}: not in the bucket")
    pending = await store.unapplied(args.name)
    if pending and not args.force:
        raise ControlError(f"{args.name}: {pending} entries are not applied yet; wait for the drain "
                           "(walcar status) or --force")
    await store.delete(args.name, current.revision)
    out.append(f"{args.name}: removed from the bucket (sidecars fall back to their file's {args.name}, if any)")


Command = Callable[[NamespaceStore, argparse.Namespace, list[str]], Awaitable[None]]


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from sidecar.log.service import open_connection

        try:
            config = _config(args)
        except UsageError as exc:
            print(f"walcar: {exc}", file=sys.stderr)
            return EXIT_USAGE
        out: list[str] = []

        async def main() -> None:
            async with open_connection(config, name="walcar-ns") as conn:
                store = NamespaceStore(conn, replicas=args.replicas)
                await store.open()
                await command(store, args, out)

        code = 0
        try:
            trio.run(main)
        except (ControlError, UsageError) as exc:
            code = EXIT_REFUSED if isinstance(exc, ControlError) else EXIT_USAGE
            out.append(f"walcar: {exc}")
        except (ConnectionError, OSError) as exc:
            code = EXIT_USAGE
            out.append(f"walcar: cannot reach NATS: {exc}")
        text = "\n".join(out)
        print(text, file=sys.stderr if code else sys.stdout)
        return code

    return run


def add_parser(sub: Any) -> None:
    ns = sub.add_parser("ns", help="namespaces in the control plane (NATS KV), applied live")
    ns_sub = ns.add_subparsers(dest="ns_command", required=True)

    def command(name: str, help_text: str, func: Command) -> argparse.ArgumentParser:
        parser = ns_sub.add_parser(name, help=help_text)
        parser.add_argument("--config", "-c", help="whose NATS to use (default $WALCAR_CONFIG)")
        parser.add_argument("--replicas", type=int, default=1,
                            help="replicas of the bucket when this creates it (3 on a 3-node cluster)")
        parser.set_defaults(func=_run(func))
        return parser

    apply = command("apply", "validate and write namespaces from a file", cmd_apply)
    apply.add_argument("-f", "--file", required=True, help="TOML or YAML with [namespaces.NAME] tables")
    apply.add_argument("--dry-run", action="store_true", help="print the diff against what is live; write nothing")
    command("ls", "namespaces in the bucket", cmd_ls)
    get = command("get", "one namespace's document", cmd_get)
    get.add_argument("name")
    get.add_argument("--format", choices=["toml", "json"], default="toml")
    history = command("history", "every revision: who, when, what changed", cmd_history)
    history.add_argument("name")
    rollback = command("rollback", "apply an earlier revision again", cmd_rollback)
    rollback.add_argument("name")
    rollback.add_argument("--to", type=int, required=True, metavar="REV")
    rm = command("rm", "remove a namespace from the bucket", cmd_rm)
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="even with un-applied entries")
