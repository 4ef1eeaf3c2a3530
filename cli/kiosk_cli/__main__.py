"""The `kiosk` command: submit jobs, watch queues and fetch results.

Exit codes: 0 success, 1 error (bad input, Redis or bucket unreachable), 3 a job failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

import kiosk_protocol as protocol
from kiosk_cli import connect, display, follow, inputs, pools, results, status, submit
from kiosk_cli.display import VALUE_LIMIT, safe
from kiosk_cli.errors import CliError
from kiosk_protocol import zipjobs
from kiosk_protocol.errors import printable
from kiosk_protocol.registry import heartbeat_ttl

log = logging.getLogger("kiosk_cli")
EXIT_ERROR = 1
EXIT_JOB_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiosk", description="Submit and follow DeepCell-Kiosk jobs.")
    parser.add_argument("--debug", action="store_true", help="log details and tracebacks to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="upload images and enqueue jobs")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="images, zip archives or folders of them")
    p.add_argument("--queue", default="segmentation", help="job type / queue (default: segmentation)")
    p.add_argument("--model-name", default="", help="model to run (the consumer's default if empty)")
    p.add_argument("--model-version", default="", help="model version")
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                   help="extra Kiosk job field, e.g. scale=1.2 or segmentation_type=nuclear (repeatable)")
    p.add_argument("--wait", action="store_true", help="follow progress, then download results")
    p.add_argument("--out", default="results", help="folder for downloaded results (default: ./results)")
    p.add_argument("--timeout", type=float, default=0.0, help="give up waiting after SECONDS (0: never)")
    p.add_argument("--interval", type=float, default=0.2, help="polling interval in seconds")
    connect.add_connection_flags(p)

    s = sub.add_parser("status", help="queues, workers and pools at a glance")
    s.add_argument("--queue", action="append", default=[],
                   help="queue(s) to show (repeatable, comma-separated)")
    s.add_argument("--no-pools", action="store_true", help="do not ask Kubernetes for ConsumerPools")
    connect.add_connection_flags(s)

    r = sub.add_parser("results", help="show a job's fields and fetch its output")
    r.add_argument("job", metavar="JOB_KEY")
    r.add_argument("--out", default="results", help="folder for the output (default: ./results)")
    r.add_argument("--no-download", action="store_true", help="only show the fields")
    connect.add_connection_flags(r)
    return parser


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    files = inputs.expand_inputs(args.paths)
    fields = submit.parse_fields(args.field)
    settings = connect.settings_from_args(args)
    client = connect.redis_client(settings)
    storage = connect.storage_for(settings)
    jobs = submit.submit_files(
        client, storage, files, args.queue, args.model_name, args.model_version, fields
    )
    if not args.wait:
        for job in jobs:
            console.print(job.key, markup=False, highlight=False, soft_wrap=True)
        return 0
    labels = {job.key: job.local_path.name for job in jobs}
    keys = [job.key for job in jobs]
    with display.ProgressBars(console, keys, labels) as bars:
        finished = follow.wait_jobs(client, keys, bars.update, interval=args.interval, timeout=args.timeout)
    downloads = {}
    out_dir = Path(args.out)
    for job in finished:
        if job.status == protocol.DONE and results.output_location(job.fields):
            downloads[job.key] = results.download_output(storage, job.key, job.fields, out_dir)
    console.print(display.outcome_table(finished, downloads))
    failed = [job for job in finished if job.status != protocol.DONE]
    if failed:
        console.print(f"[red]{len(failed)} of {len(finished)} jobs failed")
        return EXIT_JOB_FAILED
    console.print(f"[green]{len(finished)} jobs done; results in {out_dir}/")
    return 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    settings = connect.settings_from_args(args)
    client = connect.redis_client(settings)
    pool_rows, note = (None, "skipped (--no-pools)") if args.no_pools else pools.list_pools()
    wanted = [q.strip() for item in args.queue for q in item.split(",") if q.strip()]
    queues = wanted or status.discover_queues(client, settings.queues + pools.pool_queues(pool_rows))
    # Stale: overdue by the workers' own liveness rule (the operator and reclaim use the same).
    stale_after = heartbeat_ttl(settings.heartbeat_interval)
    snapshot = status.collect(client, queues, stale_after, pool_rows, note)
    for table in display.status_tables(snapshot):
        console.print(table)
    return 0


def cmd_results(args: argparse.Namespace, console: Console) -> int:
    settings = connect.settings_from_args(args)
    client = connect.redis_client(settings)
    fields = client.hgetall(args.job)
    if not fields:
        raise CliError(f"no job {args.job} in Redis (wrong key, or it expired)")
    console.print(display.fields_table(args.job, fields))
    failures = zipjobs.decode_failures(fields.get("failures"))
    for child, reason in failures.items():
        console.print(Text.assemble(("failed", "red"), " ", safe(child), ": ", safe(reason)), highlight=False)
    status_ = fields.get("status", "")
    if status_ == protocol.FAILED:
        reason = fields.get("reason", "") or "no reason given"
        console.print(Text.assemble("job failed: ", safe(reason), style="red"), highlight=False)
        return EXIT_JOB_FAILED
    if status_ != protocol.DONE:
        console.print(Text.assemble("job is not finished yet (status ", safe(status_), ")"), highlight=False)
        return 0
    if not args.no_download:
        storage = connect.storage_for(settings)
        path = results.download_output(storage, args.job, fields, Path(args.out))
        console.print(Text.assemble("output saved to ", safe(path)), highlight=False)
    return 0


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "results": cmd_results}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    console = Console()
    errors = Console(stderr=True)
    try:
        return COMMANDS[args.command](args, console)
    except CliError as exc:  # messages may quote keys and fields read from Redis
        errors.print(f"error: {printable(exc, VALUE_LIMIT)}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line for the user, traceback in the log
        log.debug("unexpected error", exc_info=True)
        hint = "" if args.debug else " (run with --debug for details)"
        message = f"error: {type(exc).__name__}: {printable(exc, VALUE_LIMIT)}{hint}"
        errors.print(message, markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
