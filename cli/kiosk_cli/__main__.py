"""The `kiosk` command: submit jobs, watch queues and fetch results.

Exit codes (EPILOG, also in the README): 0 success, 1 error (bad input, Redis or bucket
unreachable), 2 usage, 3 a job failed, 4 ``--wait`` timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
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
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a process the signal killed would report
OUTPUTS = ("table", "json", "yaml")

EPILOG = """\
exit codes:
  0    success
  1    error: bad input, Redis or the bucket unreachable (one line on stderr)
  2    usage error: unknown command or flag, missing argument
  3    a job failed
  4    submit --wait gave up after --timeout; the unfinished job keys are printed on stdout
  130  interrupted (Ctrl-C)
  141  stdout closed early (e.g. piped into `head`)
"""


def version() -> str:
    try:
        return metadata.version("kiosk-operator")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiosk", description="Submit and follow DeepCell-Kiosk jobs.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kiosk {version()}")
    parser.add_argument("--debug", action="store_true", help="log details and tracebacks to stderr")
    try:
        import shtab
    except ImportError:  # the cli extra pins it; without it there is no completion, nothing else changes
        shtab = None
    else:
        shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script (bash, zsh, tcsh)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def complete(action: argparse.Action, what: str) -> None:
        if shtab is not None:
            action.complete = getattr(shtab, what)  # type: ignore[attr-defined]

    p = command("submit", "upload images and enqueue jobs")
    complete(p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="images, zip archives or folders of them"),
             "FILE")
    p.add_argument("--queue", "-j", "--job-type", dest="queue", default=None,
                   help="job type / queue (default: the first of QUEUE, like a worker: predict)")
    p.add_argument("--model-name", default="", help="model to run (the consumer's default if empty)")
    p.add_argument("--model-version", default="", help="model version")
    p.add_argument("-m", "--model", default="", metavar="NAME:VERSION",
                   help="model name and version in one (kiosk-client's --model)")
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                   help="extra Kiosk job field, e.g. scale=1.2 or segmentation_type=nuclear (repeatable)")
    alias = p.add_argument_group("kiosk-client flags (each sets the job field of the same meaning)")
    for flags, field in submit.FIELD_FLAGS:
        alias.add_argument(*flags, dest=f"field_{field}", default=None, metavar="VALUE", help=f"job field {field}")
    p.add_argument("--wait", action="store_true", help="follow progress, then download results")
    complete(p.add_argument("--out", "--output-dir", dest="out", default="results",
                            help="folder for downloaded results (default: ./results)"), "DIRECTORY")
    p.add_argument("--timeout", type=float, default=0.0,
                   help=f"give up waiting after SECONDS (0: never); exit code {EXIT_TIMEOUT}")
    p.add_argument("--interval", type=float, default=0.2, help="polling interval in seconds")
    connect.add_connection_flags(p)

    s = command("status", "queues, workers and pools at a glance")
    s.add_argument("--queue", action="append", default=[],
                   help="queue(s) to show (repeatable, comma-separated; default: QUEUE, the workers' and the pools')")
    add_output_flag(s)
    k8s = s.add_argument_group("ConsumerPools (Kubernetes)")
    k8s.add_argument("--no-pools", action="store_true", help="do not ask Kubernetes for ConsumerPools")
    k8s.add_argument("-n", "--namespace", help="namespace of the pools (default: the kubeconfig context's)")
    k8s.add_argument("-A", "--all-namespaces", action="store_true", help="pools of every namespace")
    k8s.add_argument("--context", help="kubeconfig context (default: the current one)")
    connect.add_connection_flags(s)

    r = command("results", "show a job's fields and fetch its output")
    r.add_argument("job", metavar="JOB_KEY")
    complete(r.add_argument("--out", "--output-dir", dest="out", default="results",
                            help="folder for the output (default: ./results)"), "DIRECTORY")
    r.add_argument("--no-download", action="store_true", help="only show the fields")
    r.add_argument("--preview", action="store_true",
                   help="also write a PNG per result: the input with label outlines (needs the worker extra)")
    add_output_flag(r)
    connect.add_connection_flags(r)
    return parser


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                        help="table for people (default), json or yaml for scripts (never cropped)")


def emit(fmt: str, data: Any) -> None:
    """json/yaml on stdout, whole (no terminal width, no markup); control characters escaped."""
    if fmt == "json":
        text = json.dumps(data, indent=2)
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    files = inputs.expand_inputs(args.paths)
    fields = submit.parse_fields(args.field)
    fields.update(submit.alias_fields(args))
    model_name, model_version = submit.model_flags(args.model, args.model_name, args.model_version)
    settings = connect.settings_from_args(args)
    queue = args.queue or settings.queues[0]
    client = connect.redis_client(settings)
    storage = connect.storage_for(settings)
    jobs = submit.submit_files(client, storage, files, queue, model_name, model_version, fields)
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
    if args.no_pools:
        pool_rows, note = None, "skipped (--no-pools)"
    else:
        pool_rows, note = pools.list_pools(args.namespace, args.context, args.all_namespaces)
    wanted = [q.strip() for item in args.queue for q in item.split(",") if q.strip()]
    queues = wanted or status.discover_queues(client, settings.queues + pools.pool_queues(pool_rows))
    # Stale: overdue by the workers' own liveness rule (the operator and reclaim use the same).
    stale_after = heartbeat_ttl(settings.heartbeat_interval)
    snapshot = status.collect(client, queues, stale_after, pool_rows, note)
    if args.output != "table":
        emit(args.output, dataclasses.asdict(snapshot))
        return 0
    for table in display.status_tables(snapshot):
        console.print(table)
    return 0


def cmd_results(args: argparse.Namespace, console: Console) -> int:
    if args.preview and args.no_download:
        raise CliError("--preview needs the output: drop --no-download")
    settings = connect.settings_from_args(args)
    client = connect.redis_client(settings)
    fields = client.hgetall(args.job)
    if not fields:
        raise CliError(f"no job {args.job} in Redis (wrong key, or it expired)")
    table = args.output == "table"
    failures = zipjobs.decode_failures(fields.get("failures"))
    status_ = fields.get("status", "")
    report: dict[str, Any] = {"key": args.job, "status": status_, "fields": fields, "failures": failures,
                              "output": None, "previews": []}
    if table:
        console.print(display.fields_table(args.job, fields))
        for child, reason in failures.items():
            console.print(Text.assemble(("failed", "red"), " ", safe(child), ": ", safe(reason)), highlight=False)
    if status_ == protocol.FAILED:
        if table:
            reason = fields.get("reason", "") or "no reason given"
            console.print(Text.assemble("job failed: ", safe(reason), style="red"), highlight=False)
        else:
            emit(args.output, report)
        return EXIT_JOB_FAILED
    if status_ != protocol.DONE:
        if table:
            console.print(Text.assemble("job is not finished yet (status ", safe(status_), ")"), highlight=False)
        else:
            emit(args.output, report)
        return 0
    if not args.no_download:
        out_dir = Path(args.out)
        storage = connect.storage_for(settings)
        path = results.download_output(storage, args.job, fields, out_dir)
        report["output"] = path
        if table:
            console.print(Text.assemble("output saved to ", safe(path)), highlight=False)
        if args.preview:
            for png in results.previews(storage, args.job, fields, Path(path), out_dir):
                report["previews"].append(str(png))
                if table:
                    console.print(Text.assemble("preview saved to ", safe(png)), highlight=False)
    if not table:
        emit(args.output, report)
    return 0


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "results": cmd_results}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that closes stdout early (``| head``) ends it quietly."""
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Later flushes at exit would raise again: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    console = Console()
    errors = Console(stderr=True)
    try:
        return COMMANDS[args.command](args, console)
    except follow.WaitTimeout as exc:  # the keys on stdout, so a script can `kiosk results` them later
        errors.print(f"error: {printable(exc, VALUE_LIMIT)}", markup=False, highlight=False, soft_wrap=True)
        for key in exc.unfinished:
            console.print(key, markup=False, highlight=False, soft_wrap=True)
        return EXIT_TIMEOUT
    except CliError as exc:  # messages may quote keys and fields read from Redis
        errors.print(f"error: {printable(exc, VALUE_LIMIT)}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: one line for the user, traceback in the log
        log.debug("unexpected error", exc_info=True)
        hint = "" if args.debug else " (run with --debug for details)"
        message = f"error: {type(exc).__name__}: {printable(exc, VALUE_LIMIT)}{hint}"
        errors.print(message, markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
