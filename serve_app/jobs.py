"""The job state machine: plain Python, no Ray, no I/O.

    queued ──start──▶ processing ──complete──▶ completed
      │  ▲               │  │
      │  └───requeue─────┘  └──fail──▶ failed
      └──────cancel / fail───────────▶ cancelled / failed

Each transition is one method that stamps its own timestamps; an illegal one raises
`IllegalTransition`. Records are rendered to the wire (camelCase) here and nowhere else.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from serve_app.errors import IllegalTransition
from serve_app.schemas import GenerationTask, JobType, Priority


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_job_id(now_ms: int) -> str:
    """`job_<unix ms>_<9 random chars>`, the seed document's shape."""
    return f"job_{now_ms}_{''.join(secrets.choice(_ID_ALPHABET) for _ in range(9))}"


def iso(ms: int | None) -> str | None:
    """Unix milliseconds as `2025-11-07T10:00:00.000Z`."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ms % 1000:03d}Z"
    )


@dataclass
class JobResult:
    """A completed job's output. `images` are data URIs, encoded once at completion."""

    images: list[str]
    seeds: list[int]
    parameters: dict[str, Any]
    time_taken_ms: int
    content_type: str
    nsfw_detected: list[bool] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.images,
            "seed": self.seeds[0] if self.seeds else None,
            "seeds": self.seeds,
            "parameters": self.parameters,
            "timeTaken": self.time_taken_ms,
            "contentType": self.content_type,
        }
        if self.nsfw_detected:
            out["nsfwContentDetected"] = self.nsfw_detected
        return out


@dataclass
class Job:
    """One generation job. `request` is the normalized wire request (no image payloads)."""

    id: str
    type: JobType
    model: str
    request: dict[str, Any]
    created_at_ms: int
    priority: Priority = Priority.NORMAL
    status: JobStatus = JobStatus.QUEUED
    progress: int = 0
    phase: str | None = "queued"
    started_at_ms: int | None = None
    completed_at_ms: int | None = None
    result: JobResult | None = None
    error: str | None = None
    attempts: int = 0
    replica: str | None = None
    # What to run; kept until the job ends so a restart can re-dispatch it.
    task: GenerationTask | None = None
    idempotency_key: str | None = None

    # -- transitions ---------------------------------------------------------------

    def start(self, now_ms: int, replica: str | None = None) -> None:
        self._require(JobStatus.QUEUED, "start")
        self.status = JobStatus.PROCESSING
        self.started_at_ms = now_ms
        self.attempts += 1
        self.replica = replica
        self.phase = "generating"

    def report_progress(self, step: int, total: int) -> None:
        self._require(JobStatus.PROCESSING, "report progress on")
        if total > 0:
            # 100 is reserved for "completed": a finished denoise still has to decode.
            self.progress = max(self.progress, min(99, (100 * step) // total))

    def complete(self, result: JobResult, now_ms: int) -> None:
        self._require(JobStatus.PROCESSING, "complete")
        self.status = JobStatus.COMPLETED
        self.result = result
        self.progress = 100
        self.completed_at_ms = now_ms
        self.phase = None

    def fail(self, error: str, now_ms: int) -> None:
        if self.status.is_terminal():
            raise IllegalTransition(f"cannot fail job {self.id}: it is already {self.status}")
        self.status = JobStatus.FAILED
        self.error = error
        self.completed_at_ms = now_ms
        self.phase = None

    def cancel(self, now_ms: int) -> None:
        if self.status.is_terminal():
            raise IllegalTransition(f"cannot cancel job {self.id}: it is already {self.status}")
        # progress stays where the job stopped
        self.status = JobStatus.CANCELLED
        self.completed_at_ms = now_ms
        self.phase = None

    def requeue(self, reason: str) -> None:
        """Back to the queue after its replica died; the attempt stays counted."""
        self._require(JobStatus.PROCESSING, "requeue")
        self.status = JobStatus.QUEUED
        self.started_at_ms = None
        self.progress = 0
        self.replica = None
        self.phase = f"retrying: {reason}"

    def _require(self, expected: JobStatus, action: str) -> None:
        if self.status is not expected:
            raise IllegalTransition(
                f"cannot {action} job {self.id}: it is {self.status}, not {expected}"
            )

    # -- rendering -----------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The GET /jobs entry: no request echo, no images."""
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type.value,
            "status": self.status.value,
            "model": self.model,
            "priority": self.priority.value,
            "progress": self.progress,
            "createdAt": iso(self.created_at_ms),
        }
        if self.completed_at_ms is not None:
            out["completedAt"] = iso(self.completed_at_ms)
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_wire(self, queue_position: int | None = None) -> dict[str, Any]:
        """The full record, as GET /jobs/:id and the submit response show it."""
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type.value,
            "status": self.status.value,
            "request": self.request,
            "model": self.model,
            "priority": self.priority.value,
            "createdAt": iso(self.created_at_ms),
            "progress": self.progress,
        }
        if self.phase is not None:
            out["phase"] = self.phase
        if queue_position is not None:
            out["queuePosition"] = queue_position
        if self.started_at_ms is not None:
            out["startedAt"] = iso(self.started_at_ms)
        if self.completed_at_ms is not None:
            out["completedAt"] = iso(self.completed_at_ms)
        if self.result is not None:
            out["result"] = self.result.to_wire()
        if self.error is not None:
            out["error"] = self.error
        if self.attempts:
            out["attempts"] = self.attempts
        return out
