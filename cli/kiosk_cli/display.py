"""Everything the CLI draws with rich: progress bars, tables, job fields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import kiosk_protocol as protocol
from kiosk_cli.follow import MISSING, JobProgress
from kiosk_cli.status import Snapshot

_STATUS_STYLE = {protocol.DONE: "green", protocol.FAILED: "red", MISSING: "red"}


class ProgressBars:
    """One bar per job plus an overall bar counting finished jobs."""

    def __init__(self, console: Console, keys: Sequence[str], labels: Mapping[str, str]) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.overall: TaskID = self.progress.add_task("[bold]all jobs", total=len(keys), status="")
        self.tasks = {
            key: self.progress.add_task(labels.get(key, key), total=1.0, status="new") for key in keys
        }

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, jobs: Sequence[JobProgress]) -> None:
        for job in jobs:
            style = _STATUS_STYLE.get(job.status, "cyan")
            self.progress.update(self.tasks[job.key], completed=job.fraction, status=f"[{style}]{job.status}")
        done = sum(job.finished for job in jobs)
        failed = sum(job.finished and job.status != protocol.DONE for job in jobs)
        label = f"{done}/{len(jobs)} finished" + (f", [red]{failed} failed" if failed else "")
        self.progress.update(self.overall, completed=done, status=label)


def outcome_table(jobs: Sequence[JobProgress], downloads: Mapping[str, str]) -> Table:
    table = Table(title="results")
    table.add_column("job", overflow="fold")
    table.add_column("status")
    table.add_column("output / reason", overflow="fold")
    for job in jobs:
        style = _STATUS_STYLE.get(job.status, "")
        detail = downloads.get(job.key) or job.fields.get("output_url", "") or job.fields.get("reason", "")
        if job.status != protocol.DONE:
            detail = job.fields.get("reason", "") or detail
        table.add_row(job.key, f"[{style}]{job.status}" if style else job.status, detail)
    return table


def status_tables(snapshot: Snapshot) -> list[Table | Text]:
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("pending", justify="right")
    queues.add_column("in flight", justify="right")
    queues.add_column("workers", justify="right")
    for q in snapshot.queues:
        queues.add_row(q.name, str(q.pending), str(q.in_flight), str(q.workers))

    workers = Table(title="workers")
    for name in ("worker", "queue", "heartbeat", "state", "in flight", "current item", "done", "failed"):
        # Keys are long: only the current item may wrap, everything else stays on one line.
        workers.add_column(name, overflow="fold", no_wrap=name != "current item", min_width=len(name))
    for w in snapshot.workers:
        age = f"{w.age:.1f}s ago"
        if w.stale:
            age = f"[red]{age} (stale)"
        workers.add_row(w.name, w.queue, age, w.state, str(w.in_flight), w.current, w.done, w.failed)
    if not snapshot.workers:
        workers.add_row("(none registered)", "", "", "", "", "", "", "")

    if snapshot.pools is None:
        return [queues, workers, Text(f"pools: unknown ({snapshot.pools_note})", style="dim")]
    tables: list[Table | Text] = [queues, workers]
    pools = Table(title="pools")
    for name in ("pool", "queues", "mode", "desired", "workers", "pending", "in flight", "ready"):
        pools.add_column(name, no_wrap=name != "queues", min_width=len(name))
    if not snapshot.pools:
        pools.add_row("(no ConsumerPools)", "", "", "", "", "", "", "")
    for p in snapshot.pools or ():
        pools.add_row(p.name, p.queues, p.mode, p.desired, p.workers, p.pending, p.in_flight, p.ready)
    tables.append(pools)
    return tables


def fields_table(key: str, fields: Mapping[str, str]) -> Table:
    table = Table(title=key, show_header=True)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in sorted(fields):
        table.add_row(name, fields[name])
    return table
