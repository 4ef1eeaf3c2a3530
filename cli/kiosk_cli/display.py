"""Everything the CLI draws with rich: progress bars, tables, job fields.

Job keys and fields come from a public web form, through Redis: every value read from Redis
is shown as plain text (``safe``: a rich Text, never parsed as markup), with control
characters escaped (an ESC cannot reach the terminal) and capped in length. Where rich
wants a markup string (progress columns), ``safe_markup`` escapes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import kiosk_protocol as protocol
from kiosk_cli.follow import MISSING, JobProgress
from kiosk_cli.status import Snapshot
from kiosk_protocol.errors import printable

_STATUS_STYLE = {protocol.DONE: "green", protocol.FAILED: "red", MISSING: "red"}
#: Characters of one value from Redis shown in a table cell or a message.
VALUE_LIMIT = 2000
#: Characters of a short value (a status, a progress-bar label).
SHORT_LIMIT = 80


def safe(value: object, style: str = "", limit: int = VALUE_LIMIT) -> Text:
    """A value from Redis as plain text: no markup, control characters escaped, capped."""
    return Text(printable("" if value is None else value, limit), style=style)


def safe_markup(value: object, limit: int = SHORT_LIMIT) -> str:
    """A value from Redis inside a markup string: escaped, control characters escaped, capped."""
    return escape(printable("" if value is None else value, limit))


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
            key: self.progress.add_task(safe_markup(labels.get(key, key)), total=1.0, status="new")
            for key in keys
        }

    def __enter__(self) -> ProgressBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, jobs: Sequence[JobProgress]) -> None:
        for job in jobs:
            style = _STATUS_STYLE.get(job.status, "cyan")
            status = f"[{style}]{safe_markup(job.status)}"
            self.progress.update(self.tasks[job.key], completed=job.fraction, status=status)
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
        table.add_row(safe(job.key), safe(job.status, style), safe(detail))
    return table


def status_tables(snapshot: Snapshot) -> list[Table | Text]:
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("pending", justify="right")
    queues.add_column("in flight", justify="right")
    queues.add_column("workers", justify="right")
    for q in snapshot.queues:
        queues.add_row(safe(q.name), str(q.pending), str(q.in_flight), str(q.workers))

    workers = Table(title="workers")
    for name in ("worker", "queue", "heartbeat", "state", "in flight", "current item", "done", "failed"):
        # Keys are long: only the current item may wrap, everything else stays on one line.
        workers.add_column(name, overflow="fold", no_wrap=name != "current item", min_width=len(name))
    for w in snapshot.workers:
        age = Text(f"{w.age:.1f}s ago (stale)", style="red") if w.stale else Text(f"{w.age:.1f}s ago")
        workers.add_row(safe(w.name), safe(w.queue), age, safe(w.state), str(w.in_flight), safe(w.current),
                        safe(w.done), safe(w.failed))
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
        pools.add_row(*(safe(v) for v in (p.name, p.queues, p.mode, p.desired, p.workers, p.pending,
                                          p.in_flight, p.ready)))
    tables.append(pools)
    return tables


def fields_table(key: str, fields: Mapping[str, str]) -> Table:
    table = Table(title=safe(key), show_header=True)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in sorted(fields):
        table.add_row(safe(name, limit=SHORT_LIMIT), safe(fields[name]))
    return table
