"""Job stores: the interface the tracker persists through, the record codec, a memory store.

The tracker keeps unfinished jobs in memory and writes every transition through a store;
finished jobs are read back from the store on demand, so memory does not grow with history.
Implementations: `MemoryStore` (tests, throwaway runs), `SQLiteStore` (one node, durable),
`RedisStore` (clusters). One contract test-suite runs against all of them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.jobs import Job, JobResult, JobStatus
from serve_app.schemas import GenerationTask, InputImage, JobType, OutputFormat, Priority


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    type: JobType | None = None
    model: str | None = None


@dataclass(frozen=True)
class Page:
    """One page of a listing: job summaries (`Job.summary()`, no payloads), newest first."""

    jobs: list[dict[str, Any]]
    next_cursor: str | None


class JobStore(Protocol):
    """Durable job records. Every method is synchronous and cheap (one key or index read)."""

    def save(self, job: Job) -> None:
        """Insert or replace the whole record."""

    def load(self, job_id: str) -> Job | None: ...

    def unfinished(self) -> list[Job]:
        """Queued and processing jobs, oldest first: what a restart must pick up again."""

    def find_idempotent(self, key: str) -> str | None:
        """The id of the job submitted with this Idempotency-Key, if any."""

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        """Newest first; `cursor` is the `next_cursor` of the previous page."""

    def counts(self) -> dict[JobStatus, int]: ...

    def processing_time(self) -> tuple[int, int]:
        """(number of completed jobs, sum of their processing times in ms)."""

    def prune(self, finished_before_ms: int, keep_last: int) -> int:
        """Delete finished jobs older than the cutoff, or beyond the newest `keep_last`."""

    def close(self) -> None: ...


# -- codec: Job <-> JSON-safe dict -------------------------------------------------------


def _image_to_json(img: InputImage | None) -> dict[str, Any] | None:
    if img is None:
        return None
    return {"png": base64.b64encode(img.png).decode(), "width": img.width, "height": img.height}


def _image_from_json(data: dict[str, Any] | None) -> InputImage | None:
    if data is None:
        return None
    return InputImage(base64.b64decode(data["png"]), data["width"], data["height"])


_IMAGE_SLOTS = ("init_image", "mask_image", "style_image")


def task_to_json(task: GenerationTask) -> dict[str, Any]:
    out = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    for slot in _IMAGE_SLOTS:
        out[slot] = _image_to_json(out[slot])
    out["mode"] = task.mode.value
    out["output_format"] = task.output_format.value
    return out


def task_from_json(data: dict[str, Any]) -> GenerationTask:
    values = dict(data)
    for slot in _IMAGE_SLOTS:
        values[slot] = _image_from_json(values.get(slot))
    values["mode"] = JobType(values["mode"])
    values["output_format"] = OutputFormat(values["output_format"])
    return GenerationTask(**values)


def job_to_json(job: Job) -> dict[str, Any]:
    out = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    out["type"] = job.type.value
    out["priority"] = job.priority.value
    out["status"] = job.status.value
    out["result"] = dataclasses.asdict(job.result) if job.result else None
    # A finished job never runs again: drop its task (and any input images it carries).
    out["task"] = task_to_json(job.task) if job.task and not job.status.is_terminal() else None
    return out


def job_from_json(data: dict[str, Any]) -> Job:
    values = dict(data)
    values["type"] = JobType(values["type"])
    values["priority"] = Priority(values["priority"])
    values["status"] = JobStatus(values["status"])
    values["result"] = JobResult(**values["result"]) if values.get("result") else None
    values["task"] = task_from_json(values["task"]) if values.get("task") else None
    return Job(**values)


def dumps(job: Job) -> str:
    return json.dumps(job_to_json(job), separators=(",", ":"))


def dumps_summary(job: Job) -> str:
    """What listings read: stored beside the record so a page never decodes images."""
    return json.dumps(job.summary(), separators=(",", ":"))


def loads(text: str | bytes) -> Job:
    return job_from_json(json.loads(text))


def sort_key(job: Job) -> tuple[int, str]:
    """Listing order (newest first when reversed): creation time, then id as tie-break."""
    return (job.created_at_ms, job.id)


def encode_cursor(job: Job) -> str:
    return f"{job.created_at_ms}:{job.id}"


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Raises ValueError on a malformed cursor; the caller reports it as bad input."""
    ms, _, job_id = cursor.partition(":")
    if not job_id:
        raise ValueError(cursor)
    return int(ms), job_id


class MemoryStore:
    """A JobStore in a dict: nothing survives the process. Records are stored encoded, so
    it behaves like the durable stores (a loaded job is a copy, never the live object)."""

    def __init__(self) -> None:
        self._rows: dict[str, str] = {}
        self._idempotency: dict[str, str] = {}

    def save(self, job: Job) -> None:
        self._rows[job.id] = dumps(job)
        if job.idempotency_key:
            self._idempotency.setdefault(job.idempotency_key, job.id)

    def load(self, job_id: str) -> Job | None:
        row = self._rows.get(job_id)
        return loads(row) if row is not None else None

    def _all(self) -> list[Job]:
        return [loads(r) for r in self._rows.values()]

    def unfinished(self) -> list[Job]:
        jobs = [j for j in self._all() if not j.status.is_terminal()]
        return sorted(jobs, key=sort_key)

    def find_idempotent(self, key: str) -> str | None:
        job_id = self._idempotency.get(key)
        return job_id if job_id in self._rows else None

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        jobs = sorted(self._all(), key=sort_key, reverse=True)
        if cursor is not None:
            after = decode_cursor(cursor)
            jobs = [j for j in jobs if sort_key(j) < after]
        jobs = [
            j
            for j in jobs
            if (flt.status is None or j.status is flt.status)
            and (flt.type is None or j.type is flt.type)
            and (flt.model is None or j.model == flt.model)
        ]
        page = jobs[:limit]
        more = len(jobs) > limit
        return Page([j.summary() for j in page],
                    encode_cursor(page[-1]) if more and page else None)

    def counts(self) -> dict[JobStatus, int]:
        out = dict.fromkeys(JobStatus, 0)
        for job in self._all():
            out[job.status] += 1
        return out

    def processing_time(self) -> tuple[int, int]:
        done = [j for j in self._all() if j.status is JobStatus.COMPLETED and j.result]
        return len(done), sum(j.result.time_taken_ms for j in done if j.result)

    def prune(self, finished_before_ms: int, keep_last: int) -> int:
        finished = sorted(
            (j for j in self._all() if j.status.is_terminal()), key=sort_key, reverse=True
        )
        doomed = [
            j
            for i, j in enumerate(finished)
            if i >= keep_last or (j.completed_at_ms or 0) < finished_before_ms
        ]
        for job in doomed:
            del self._rows[job.id]
        return len(doomed)

    def close(self) -> None:
        self._rows.clear()


def open_store(kind: str, *, data_dir: str, redis_url: str) -> JobStore:
    """The store the settings name. SQLite lives at `<data_dir>/jobs.sqlite3`."""
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        from serve_app.redis_store import RedisStore

        return RedisStore(redis_url)
    from pathlib import Path

    from serve_app.sqlite_store import SQLiteStore

    return SQLiteStore(Path(data_dir) / "jobs.sqlite3")
