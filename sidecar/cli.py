"""`walcar` — the sidecar's command line.

    walcar run --config FILE [--role ingress|drain|all]     the sidecar
    walcar config check FILE [--format toml|yaml|json]       validate a config
    walcar status | dlq ... | drain --wait                  operate a running sidecar (admin endpoint)
    walcar replay | verify                                  point-in-time replay; compare targets with the journal
    walcar inject serve | wait-ready                        the Kubernetes injector
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar import config as config_mod
from sidecar import memory_budget
from sidecar.admin.cli import CliError
from sidecar.admin.cli import add_parsers as add_admin_parsers
from sidecar.control.cli import add_parser as add_ns_parser
from sidecar.inject.cli import add_parser as add_inject_parser
from sidecar.replay.cli import add_parser as add_replay_parser

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
    except config_mod.ConfigError as exc:
        print(f"{args.file}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_USAGE
    fmt = args.format or config_mod.format_of(Path(args.file))
    sys.stdout.write(config_mod.dumps(cfg, fmt))
    print(f"memory, what each budget can hold at once:\n{memory_budget.table(cfg, args.role)}", file=sys.stderr)
    problem = memory_budget.refusal(cfg, args.role)
    if problem is not None:
        print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from sidecar import logs
    from sidecar.app import Sidecar
    from sidecar.log.connection import ServerTooOld
    from sidecar.log.streams import StreamConflict
    from sidecar.secrets import SecretFileError, redact_urls

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_USAGE
    problem = memory_budget.refusal(cfg, args.role)
    if problem is not None:
        print(f"{args.config}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level or cfg.sidecar.log_level)
    # OSError: a listener could not bind; SecretFileError: a token file is missing or empty
    expected = (ServerTooOld, StreamConflict, ConnectionError, OSError, SecretFileError)
    try:
        trio.run(Sidecar(cfg, role=args.role, connect_retry=args.connect_retry, config_path=args.config).run)
    except expected as exc:
        print(f"walcar: {redact_urls(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except BaseExceptionGroup as group:  # nurseries wrap the one error that stopped the start
        leaf = _first_leaf(group)
        if not isinstance(leaf, expected):
            raise
        print(f"walcar: {redact_urls(str(leaf))}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walcar", description="write-ahead-log sidecar")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", "-c", required=True, help="config file (TOML or YAML)")
    run.add_argument("--role", choices=["ingress", "drain", "all"], default="all",
                     help="ingress: serve the listeners; drain: apply the journal to targets; all: both")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--connect-retry", type=float, default=30.0, metavar="SECONDS",
                     help="how long to keep trying to reach NATS at start (default 30)")
    run.set_defaults(func=cmd_run)

    cfg = sub.add_parser("config", help="inspect a config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config; print the effective config or every error")
    check.add_argument("file")
    check.add_argument("--format", choices=["toml", "yaml", "json"])
    check.add_argument("--role", choices=["ingress", "drain", "all"], default="all",
                       help="the role whose worst-case memory is checked (as for walcar run)")
    check.set_defaults(func=cmd_config_check)

    add_admin_parsers(sub)
    add_replay_parser(sub)
    add_ns_parser(sub)
    add_inject_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"walcar: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
