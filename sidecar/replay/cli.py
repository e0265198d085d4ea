"""`walcar replay` and `walcar verify`: the operator's commands, with a progress bar and a summary.

Registered in `sidecar/cli.py` by `add_parser(sub)`; also runnable alone as
`python -m sidecar.replay.cli replay|verify ...`. Progress goes to stderr (redrawn
four times a second on a terminal, a plain line every few seconds otherwise), the
summary to stdout (a table, or JSON with --json). Exit codes: 0 done, 1 entries
failed / differences remain / the job failed, 2 a usage, config or retention error,
130 interrupted (the checkpoint is written; `--resume` continues).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec
import trio

from sidecar import config as config_mod
from sidecar import logs
from sidecar.progress import StatusLine
from sidecar.replay.progress import ReplayProgress, ReplaySummary
from sidecar.replay.request import ReplayError, ReplayRequest, VerifyRequest, check_request
from sidecar.units import parse_hostport

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TTY_REDRAW = 0.25
TABLE_ROWS = 50

REPLAY_EXAMPLES = """\
examples:
  # the 9 a.m. drill: restore a snapshot, then replay everything since, minus the bad deploy
  walcar replay -c walcar.toml --namespace orders --from 2026-05-01T02:00:00Z \\
      --exclude-window 2026-05-01T07:10:00Z..2026-05-01T07:42:00Z \\
      --to-cassandra 10.0.0.5:9042 --keyspace orders_restored --username ops --password-file pw --dry-run
  # warm an empty cache with the last value of every key written in the last 6 hours
  walcar replay -c walcar.toml --namespace sessions --from -6h --to-memcached 10.0.0.9:11211 --last-value-only
  # continue an interrupted replay
  walcar replay -c walcar.toml --namespace orders --resume --checkpoint ~/.cache/walcar/replay/orders.db.json
"""

VERIFY_EXAMPLES = """\
examples:
  walcar verify -c walcar.toml --namespace sessions --target cache --from -1h --sample 1000
  walcar verify -c walcar.toml --namespace orders --target db --from -24h --repair
"""


# --- options -------------------------------------------------------------------------------


def _hostports(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected HOST:PORT[,HOST:PORT...]")
    for value in values:
        try:
            parse_hostport(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="the sidecar's config (TOML or YAML)")
    parser.add_argument("--namespace", "-n", metavar="NS", help="the namespace whose journal is read")
    where = parser.add_argument_group("target (one of)")
    where.add_argument("--target", metavar="NAME", help="a target of the namespace in the config")
    where.add_argument("--to-memcached", type=_hostports, metavar="HOST:PORT[,...]",
                       help="memcached server(s) given here, e.g. an empty cache to warm")
    where.add_argument("--to-cassandra", type=_hostports, metavar="HOST:PORT[,...]",
                       help="Cassandra contact point(s) given here, e.g. a restored keyspace (with --keyspace)")
    cass = parser.add_argument_group("--to-cassandra settings")
    cass.add_argument("--keyspace", metavar="KS")
    cass.add_argument("--table", metavar="T", help="the KV table (default: the namespace's name)")
    cass.add_argument("--username", metavar="U")
    cass.add_argument("--password-file", metavar="FILE")
    cass.add_argument("--local-dc", metavar="DC")
    cass.add_argument("--tls-ca", metavar="FILE", help="TLS to Cassandra, trusting this PEM CA bundle")
    cass.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for require_client_auth")
    cass.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert")
    cass.add_argument("--tls-no-check-hostname", action="store_true",
                      help="accept a node certificate that does not name the contact point")
    cass.add_argument("--consistency", default="LOCAL_QUORUM",
                      choices=["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "ALL", "EACH_QUORUM"])
    where.add_argument("--as", dest="as_target", metavar="NAME",
                       help="the namespace target a --to-* target stands in for: entries addressed to other "
                            "targets are skipped (default: the namespace's target of the same type)")
    rng = parser.add_argument_group("range (by the time entries were journaled, or stream sequence)")
    rng.add_argument("--from", dest="from_", metavar="WHEN",
                     help="RFC3339 time with a zone, relative (-2h, -1h30m), now, or seq:N (default: oldest held)")
    rng.add_argument("--to", metavar="WHEN", help="same forms, inclusive (default: the last entry at start)")
    ex = parser.add_argument_group("exclusions (repeatable; an entry matching any one is left out)")
    ex.add_argument("--exclude-key", action="append", default=[], metavar="GLOB",
                    help="fnmatch on the key, and on key/item for KV items")
    ex.add_argument("--exclude-seq", action="append", default=[], metavar="A-B", help="stream sequences, inclusive")
    ex.add_argument("--exclude-op", action="append", default=[], metavar="OP", help="put, delete, touch or cql")
    ex.add_argument("--exclude-origin", action="append", default=[], metavar="REGION",
                    help="the region a write entered walcar (glob)")
    ex.add_argument("--exclude-window", action="append", default=[], metavar="T1..T2",
                    help="by the entry's write time, inclusive")
    parser.add_argument("--batch", type=int, default=500, metavar="N", help="entries per read and apply round")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")


def add_parser(sub: Any) -> None:
    """Register `replay` and `verify` on walcar's subcommands."""
    replay = sub.add_parser(
        "replay", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPLAY_EXAMPLES,
        help="re-apply a range of a namespace's journal to a target",
        description="Re-apply a namespace's journal, from a point in time, to a target (with the original write "
                    "times), leaving out what the exclusions match.",
    )
    _common(replay)
    replay.add_argument("--dry-run", action="store_true",
                        help="read and count (by op, key prefix, exclusion) without writing anything")
    replay.add_argument("--rate", type=float, default=0.0, metavar="N", help="at most N entries per second")
    replay.add_argument("--last-value-only", action="store_true",
                        help="one write per item, its last in the range (warming a cache)")
    replay.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    replay.add_argument("--checkpoint", metavar="FILE",
                        help="checkpoint file (default: ~/.cache/walcar/replay/<namespace>.<target>.json)")
    replay.set_defaults(func=cmd_replay)

    verify = sub.add_parser(
        "verify", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=VERIFY_EXAMPLES,
        help="compare a target with the journal's last value of every key written in a range",
        description="Report the keys whose value in the target differs from the journal's last write in the range; "
                    "--repair re-applies those writes.",
    )
    _common(verify)
    verify.add_argument("--sample", type=int, default=0, metavar="N",
                        help="check N records chosen at random (default: every record written in the range)")
    verify.add_argument("--repair", action="store_true", help="re-apply the last write of every differing key")
    verify.set_defaults(func=cmd_verify)


def _target_config(args: argparse.Namespace) -> config_mod.Target | None:
    given = [flag for flag, value in (("--target", args.target), ("--to-memcached", args.to_memcached),
                                      ("--to-cassandra", args.to_cassandra)) if value]
    if len(given) > 1:
        raise ReplayError(f"give one target, not {' and '.join(given)}")
    if args.to_cassandra and not args.keyspace:
        raise ReplayError("--to-cassandra needs --keyspace")
    if not args.to_cassandra:
        extra = [flag for flag, value in (("--keyspace", args.keyspace), ("--table", args.table),
                                          ("--username", args.username), ("--password-file", args.password_file),
                                          ("--local-dc", args.local_dc), ("--tls-ca", args.tls_ca),
                                          ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)) if value]
        if extra:
            raise ReplayError(f"{', '.join(extra)} only go with --to-cassandra")
    if args.password_file and not Path(args.password_file).expanduser().is_file():
        raise ReplayError(f"--password-file {args.password_file}: no such file")
    if args.to_memcached:
        return config_mod.MemcachedTarget(name="replay", servers=args.to_memcached)
    if args.to_cassandra:
        return config_mod.CassandraTarget(
            name="replay", contact_points=args.to_cassandra, keyspace=args.keyspace, table=args.table,
            username=args.username, local_dc=args.local_dc, consistency=args.consistency,
            password_file=str(Path(args.password_file).expanduser()) if args.password_file else None,
            tls=_tls(args),
        )
    return None


def _tls(args: argparse.Namespace) -> config_mod.CassandraTls | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_no_check_hostname):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ReplayError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not Path(path).expanduser().is_file():
            raise ReplayError(f"{flag} {path}: no such file")
    ca, cert, key = (str(Path(p).expanduser()) if p else None for p in (args.tls_ca, args.tls_cert, args.tls_key))
    return config_mod.CassandraTls(ca_file=ca, cert_file=cert, key_file=key,
                                   check_hostname=not args.tls_no_check_hostname)


def _range_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "namespace": args.namespace or "", "target": args.target, "target_config": _target_config(args),
        "as_target": args.as_target, "from_": args.from_, "to": args.to, "exclude_key": args.exclude_key,
        "exclude_seq": args.exclude_seq, "exclude_op": args.exclude_op, "exclude_origin": args.exclude_origin,
        "exclude_window": args.exclude_window, "batch": args.batch,
    }


def replay_request(args: argparse.Namespace) -> ReplayRequest:
    """The options as the request the admin API takes too; ReplayError for combinations that mean nothing."""
    from sidecar.replay.checkpoint import default_path, load

    if args.resume:
        given = [flag for flag, value in (("--from", args.from_), ("--to", args.to),
                                          ("--exclude-key", args.exclude_key), ("--exclude-seq", args.exclude_seq),
                                          ("--exclude-op", args.exclude_op),
                                          ("--exclude-origin", args.exclude_origin),
                                          ("--exclude-window", args.exclude_window),
                                          ("--last-value-only", args.last_value_only)) if value]
        if given:
            raise ReplayError(f"--resume continues with the checkpoint's range and options: drop {', '.join(given)}")
        if args.checkpoint:
            path = Path(args.checkpoint).expanduser()
            namespace = args.namespace or load(path).request.namespace
            return ReplayRequest(namespace=namespace, resume=True, checkpoint=str(path), rate=args.rate,
                                 dry_run=args.dry_run)
        if not args.namespace:
            raise ReplayError("--resume needs --checkpoint FILE, or --namespace and the target to find the default")
    if not args.namespace:
        raise ReplayError("--namespace is required")
    request = ReplayRequest(**_range_fields(args), dry_run=args.dry_run, rate=args.rate,
                            last_value_only=args.last_value_only, resume=args.resume, checkpoint=args.checkpoint)
    if request.checkpoint is None and (request.target or request.target_config):
        request = msgspec.structs.replace(request, checkpoint=str(default_path(request)))
    return request


def verify_request(args: argparse.Namespace) -> VerifyRequest:
    if not args.namespace:
        raise ReplayError("--namespace is required")
    return VerifyRequest(**_range_fields(args), sample=args.sample, repair=args.repair)


def _load_config(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        lines = [f"{path}: {len(exc.errors)} error(s)", *(f"  {error}" for error in exc.errors)]
        raise ReplayError("\n".join(lines)) from None


# --- commands --------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"walcar: {message}", file=sys.stderr)


def _run(args: argparse.Namespace, make_request: Any, body: Any) -> int:
    """Load the config, build the request, run `body` under trio; every expected failure is one line."""
    from sidecar.log.connection import ServerTooOld
    from sidecar.log.streams import StreamConflict

    logs.configure(args.log_level)
    try:
        config = _load_config(args.config)
        request = make_request(args)
        check_request(config, request, time.time_ns())  # typos fail here, before anything connects
        return trio.run(body, config, request, args)
    except ReplayError as exc:
        _error(exc.message)
        return exc.exit_code
    except (ServerTooOld, StreamConflict, ConnectionError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


def cmd_replay(args: argparse.Namespace) -> int:
    return _run(args, replay_request, _replay)


def cmd_verify(args: argparse.Namespace) -> int:
    return _run(args, verify_request, _verify)


async def _with_journal(config: config_mod.Config, name: str, body: Any) -> Any:
    """Run `body(journal)` with the journal open; a job's errors come out plain, not wrapped by its nursery."""
    from sidecar.drain.targets.base import ApplyError
    from sidecar.log.service import open_journal

    failure: ReplayError | None = None
    async with open_journal(config, connect_retry=5.0, name=name, provision=False) as journal:
        try:
            return await body(journal)
        except ReplayError as exc:
            failure = exc
        except ApplyError as exc:  # verify reads the target directly: it being down ends the command
            failure = ReplayError(f"target unavailable: {exc.message}", exit_code=EXIT_FAILURE)
    raise failure


async def _replay(config: config_mod.Config, request: ReplayRequest, args: argparse.Namespace) -> int:
    from sidecar.replay.job import ReplayJob, prepare_replay

    interrupted = False
    status = StatusLine()

    async def body(journal: Any) -> ReplayJob:
        job = await prepare_replay(config, journal, request)
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        if not interrupted:
                            interrupted = True
                            print("\nwalcar: stopping after the current batch (Ctrl-C again to stop at once)",
                                  file=sys.stderr)
                            job.stop("interrupted")
                        else:
                            nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(_draw, lambda: job.progress, "replay", status)
            await job.run()
            nursery.cancel_scope.cancel()
        return job

    job = await _with_journal(config, "walcar-replay", body)
    summary = job.summary()
    status.finish()
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(summary), indent=2).decode() + "\n")
    else:
        print_summary(summary, sys.stdout)
    state = summary.progress.state
    if state == "failed":
        assert job.error is not None
        _error(job.error.message)
        return job.error.exit_code
    if state != "done":
        print(f"walcar: stopped at seq {summary.progress.checkpoint_seq}; continue with:\n  {_resume_hint(args, job)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if summary.progress.failed else EXIT_OK


def _resume_hint(args: argparse.Namespace, job: Any) -> str:
    return (f"walcar replay --config {args.config} --namespace {job.request.namespace} --resume "
            f"--checkpoint {job.checkpoint_path}")


async def _verify(config: config_mod.Config, request: VerifyRequest, args: argparse.Namespace) -> int:
    from sidecar.replay.verify import VerifyReport, prepare_verify

    status = StatusLine()

    async def body(journal: Any) -> VerifyReport:
        job = await prepare_verify(config, journal, request)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_draw, lambda: job.progress, "verify", status)
            report = await job.run()
            nursery.cancel_scope.cancel()
        return report

    report = await _with_journal(config, "walcar-verify", body)
    status.finish()
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode() + "\n")
    else:
        _print_report(report, sys.stdout)
    return EXIT_FAILURE if report.unrepaired else EXIT_OK


# --- progress --------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def render(progress: ReplayProgress, width: int = 24) -> str:
    """One status line: bar, position, counts, rate, ETA, state (and why it waits)."""
    filled = int(progress.fraction * width)
    bar = "#" * filled + "." * (width - filled)
    counts = (f"read {progress.seen or progress.scanned:,}  applied {progress.applied:,}  "
              f"excluded {progress.excluded:,}  failed {progress.failed:,}")
    line = (f"[{bar}] {progress.fraction * 100:5.1f}%  seq {progress.position:,}/{progress.to_seq:,}  {counts}  "
            f"{progress.rate:,.0f}/s  ETA {_duration(progress.eta_s)}  {progress.state}")
    if progress.message and progress.state == "waiting":
        line += f": {progress.message}"
    return line


async def _draw(current: Any, what: str, status: StatusLine) -> None:
    """Redraw in place on a terminal; plain lines (and one per state change) otherwise."""
    last_state = ""
    while True:
        progress: ReplayProgress = current()
        status.show(f"{what} " + render(progress), force=progress.state != last_state)
        last_state = progress.state
        await trio.sleep(TTY_REDRAW if status.tty else 0.5)


# --- summaries -------------------------------------------------------------------------------


def _row(out: TextIO, label: str, value: object) -> None:
    out.write(f"  {label:<18} {value}\n")


def print_summary(summary: ReplaySummary, out: TextIO) -> None:
    p = summary.progress
    verb = "dry run of a replay" if p.dry_run else "replay"
    out.write(f"{verb} of namespace {p.namespace} to {p.target}: {p.state} in {summary.elapsed_s:.1f}s\n")
    _row(out, "range", f"seq {p.from_seq}..{p.to_seq}" + (" (empty)" if p.to_seq < p.from_seq else ""))
    if summary.first_time:
        _row(out, "journaled", f"{summary.first_time} .. {summary.last_time}")
        _row(out, "write times", f"{summary.first_write_time} .. {summary.last_write_time}")
    _row(out, "entries read", f"{p.seen:,}")
    selected = sum(summary.by_op.values())
    _row(out, "would apply" if p.dry_run else "applied", f"{selected if p.dry_run else p.applied:,}")
    _row(out, "excluded", f"{p.excluded:,}")
    for reason, count in summary.excluded_by.items():
        examples = ", ".join(summary.excluded_examples.get(reason, [])[:3])
        out.write(f"    {count:>10,}  {reason}   (e.g. {examples})\n")
    _row(out, "skipped", f"{p.skipped:,}")
    for reason, count in summary.skipped_by.items():
        out.write(f"    {count:>10,}  {reason}\n")
    if p.last_value_only:
        _row(out, "superseded", f"{p.superseded:,}  (older writes of an item, --last-value-only)")
    _row(out, "failed", f"{p.failed:,}")
    _row(out, "by op", ", ".join(f"{op} {count:,}" for op, count in sorted(summary.by_op.items())) or "-")
    _row(out, "by key prefix", ", ".join(f"{prefix} {count:,}" for prefix, count in summary.by_prefix.items()) or "-")
    if p.retries:
        _row(out, "retries", f"{p.retries:,}")
    if summary.checkpoint:
        _row(out, "checkpoint", f"{summary.checkpoint} (applied through seq {p.checkpoint_seq})")
    if summary.failures:
        out.write(f"failures ({len(summary.failures)} listed, {summary.failures_not_listed} more):\n")
        for failure in summary.failures[:TABLE_ROWS]:
            name = f"{failure.key}/{failure.item}" if failure.item else failure.key
            out.write(f"  seq {failure.seq:<10} {failure.op:<7} {name:<32} {failure.error_class}: {failure.error}\n")


def _print_report(report: Any, out: TextIO) -> None:
    out.write(f"verify of namespace {report.namespace} against {report.target}: seq {report.from_seq}.."
              f"{report.to_seq}, {report.elapsed_s:.1f}s\n")
    sampled = f" (a sample of {report.records_in_range:,})" if report.sampled else ""
    _row(out, "records checked", f"{report.records_checked:,}{sampled}")
    _row(out, "items checked", f"{report.items_checked:,}")
    _row(out, "differences", f"{len(report.differences):,}")
    if report.repaired or report.unrepaired:
        _row(out, "repaired", f"{report.repaired:,}")
        _row(out, "unrepaired", f"{report.unrepaired:,}")
    for reason, count in report.not_checked.items():
        _row(out, "not checked", f"{count:,} {reason}")
    if report.differences:
        out.write(f"  {'key':<32} {'problem':<11} {'expected':<24} {'found':<24} note\n")
        for diff in report.differences[:TABLE_ROWS]:
            name = f"{diff.key}/{diff.item}" if diff.item else diff.key
            status = " [repaired]" if diff.repaired else ""
            expected = json.dumps(diff.expected)[:24] if diff.problem != "unexpected" else "(deleted)"
            found = json.dumps(diff.actual)[:24] if diff.problem != "missing" else "(absent)"
            out.write(f"  {name:<32} {diff.problem:<11} {expected:<24} {found:<24} {diff.note}{status}\n")
        if len(report.differences) > TABLE_ROWS:
            out.write(f"  ... {len(report.differences) - TABLE_ROWS} more (--json lists all)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sidecar.replay.cli replay|verify ...` (the same commands as `walcar replay|verify`)."""
    parser = argparse.ArgumentParser(prog="walcar")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
