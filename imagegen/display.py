"""How the CLI shows things: a progress bar that follows a job, tables, JSON records.

Progress and hints go to stderr, results (tables, JSON, saved files) to stdout, so
`imagegen ... --json | jq` sees only the record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imagegen.results import Job, JobPage, ModelInfo, QueueStatus

if TYPE_CHECKING:
    from rich.console import Console

    from imagegen.transport import ProgressCallback


def stdout() -> Console:
    from rich.console import Console

    # Piped, a table keeps whole ids rather than fitting the 80 columns of no terminal.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def without_images(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the CLI prints it: image data stays out (it goes to files)."""
    out = dict(record)
    if isinstance(out.get("result"), dict):
        out["result"] = {k: v for k, v in out["result"].items() if k != "images"}
    return out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def describe(job: Job) -> str:
    """One short phrase for where a job is: `queued (2nd)`, `loading model`, `generating`."""
    if job.done:
        return str(job.status)
    phase = (job.phase or str(job.status)).replace("_", " ")
    if job.queue_position:
        return f"{phase} (position {job.queue_position})"
    return phase


@contextmanager
def progress_bar(job: Job, enabled: bool = True,
                 console: Console | None = None) -> Iterator[ProgressCallback]:
    """A bar (on stderr) that follows the job's events; yields the progress callback."""
    if not enabled:
        yield lambda _job: None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.fields[job]} {task.description}"),
               BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or stderr(), transient=True) as bar:
        task = bar.add_task(describe(job), total=100, completed=job.progress, job=job.id)

        def update(current: Job) -> None:
            bar.update(task, description=describe(current), completed=current.progress)

        yield update


def show_job(job: Job) -> None:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    rows: list[tuple[str, Any]] = [
        ("id", job.id), ("type", job.type), ("status", job.status),
        ("progress", f"{job.progress}%"),
        ("phase", job.phase), ("queue position", job.queue_position), ("model", job.model),
        ("priority", job.priority), ("created", job.created_at), ("started", job.started_at),
        ("completed", job.completed_at), ("error", job.error), ("attempts", job.attempts),
    ]
    if job.request:
        rows.append(("prompt", job.request.get("prompt")))
    if job.result is not None:
        rows += [("seeds", ", ".join(map(str, job.result.seeds))),
                 ("images", len(job.result.images)),
                 ("time taken", f"{job.result.time_taken_ms} ms")]
    for name, value in rows:
        if value is not None and value != "":
            table.add_row(f"[bold]{name}[/]", str(value))
    stdout().print(table)


def show_jobs(page: JobPage) -> None:
    from rich.table import Table

    table = Table("id", "type", "status", "progress", "model", "created", box=None)
    for job in page.jobs:
        created = job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else ""
        table.add_row(job.id, job.type, str(job.status), f"{job.progress}%", job.model or "",
                      created)
    stdout().print(table)
    if page.next_cursor:
        stderr().print(f"more: imagegen jobs --cursor {page.next_cursor}")


def show_models(models: list[ModelInfo]) -> None:
    from rich.table import Table

    table = Table("id", "name", "served", "replicas", "default", "description", box=None)
    for m in models:
        table.add_row(m.id, m.name, "yes" if m.served else "no", str(m.replicas),
                      "*" if m.default else "", m.description)
    stdout().print(table)


def show_status(url: str, queue: QueueStatus) -> None:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    for name, value in (("service", url), ("queued", queue.queued_jobs),
                        ("processing", queue.processing_jobs),
                        ("completed", queue.completed_jobs), ("failed", queue.failed_jobs),
                        ("cancelled", queue.cancelled_jobs),
                        ("average time", f"{queue.average_processing_time_ms:.0f} ms")):
        table.add_row(f"[bold]{name}[/]", str(value))
    stdout().print(table)
