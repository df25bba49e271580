"""The job state machine: plain Python, no Ray, no I/O.

    queued ──start──▶ processing ──complete──▶ completed
      │  ▲               │  │
      │  └───requeue─────┘  └──fail──▶ failed
      └──────cancel / fail───────────▶ cancelled / failed

While queued a job moves through phases (`Phase`): waiting in its model's queue, admitted to
a replica call and waiting for the replica (`loading_model` on a cold model, else
`waiting_for_replica`), or back in the queue after a lost replica (`retrying`). Each
transition, phase changes included, is one method that stamps its own fields; an illegal
one raises `IllegalTransition`. Records are rendered to the wire (camelCase) here and
nowhere else; `serve_app.api.wire` describes the same shapes for OpenAPI.
"""

from __future__ import annotations

import functools
import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from serve_app.errors import IllegalTransition
from serve_app.jobs.webhook_state import WebhookState
from serve_app.messages import GenerationTask, JobType, Priority


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
# Job fields that live only in the tracker's memory, never in a store.
TRANSIENT = frozenset({"preview"})


class Phase(StrEnum):
    """Where an unfinished job is, finer than its status."""

    QUEUED = "queued"  # in its model's queue
    LOADING_MODEL = "loading_model"  # handed to a call; the model has no ready replica yet
    WAITING_FOR_REPLICA = "waiting_for_replica"  # handed to a call; a replica is up
    GENERATING = "generating"  # a replica is running it (a hires fix: its first pass)
    HIRES = "hires"  # a replica is running its hires fix's second pass
    RETRYING = "retrying"  # back in the queue after its replica was lost


_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_CHARS = 9
_ID_SPACE = len(_ID_ALPHABET) ** _ID_CHARS


# How the error of a job stopped at its JOB_TIMEOUT deadline begins (`Dispatch._expire`):
# the compatible APIs answer such a job with their timeout status.
TIMED_OUT = "Job timed out"


def new_job_id(now_ms: int) -> str:
    """`job_<unix ms>_<9 random chars>`, the seed document's shape (one draw from the OS's
    randomness for all nine: this runs for every submit)."""
    n = secrets.randbelow(_ID_SPACE)
    chars = []
    for _ in range(_ID_CHARS):
        n, digit = divmod(n, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return f"job_{now_ms}_{''.join(chars)}"


@functools.lru_cache(maxsize=4096)
def iso(ms: int | None) -> str | None:
    """Unix milliseconds as `2025-11-07T10:00:00.000Z` (a job's few times are rendered at
    every read and save: cached)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ms % 1000:03d}Z"
    )


@dataclass
class JobResult:
    """A completed job's output. `images` are references to the blob store
    (`ImageRef.to_json()`: key, content type, bytes, size, sha256), which the ingress
    turns into data URIs or URLs for a client (`serve_app.api.images`); records written
    before images left them hold data URIs, served as they are."""

    images: list[dict[str, Any] | str]
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
        if self.nsfw_detected:  # empty when no safety checker ran
            out["nsfw"] = self.nsfw_detected
        return out


@dataclass(frozen=True)
class Preview:
    """A thumbnail of the latents at `step` (`preview: true`), as a JPEG data URI."""

    step: int
    image: str

    def to_wire(self) -> dict[str, Any]:
        return {"step": self.step, "image": self.image}


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
    phase: Phase | None = Phase.QUEUED
    retry_reason: str | None = None
    started_at_ms: int | None = None
    completed_at_ms: int | None = None
    result: JobResult | None = None
    error: str | None = None
    attempts: int = 0
    replica: str | None = None
    # What to run; kept until the job ends so a restart can re-dispatch it.
    task: GenerationTask | None = None
    idempotency_key: str | None = None
    owner: str | None = None  # the API key that submitted it, by name
    fingerprint: str | None = None  # the request's digest, bound to its Idempotency-Key
    request_id: str | None = None  # the X-Request-ID of the submit, carried in its logs
    webhook: WebhookState | None = None  # where its webhooks go, and how they went
    # The latest latent thumbnail while it runs; never stored (`TRANSIENT`).
    preview: Preview | None = None

    # -- transitions while queued ----------------------------------------------------

    def admit(self, replica_ready: bool) -> None:
        """Handed to a replica call, which waits for a replica (a cold start if none)."""
        self._require(JobStatus.QUEUED, "admit")
        self.phase = Phase.WAITING_FOR_REPLICA if replica_ready else Phase.LOADING_MODEL

    def replica_ready(self) -> None:
        """The cold model it waits for has a replica now."""
        self._require(JobStatus.QUEUED, "mark ready")
        if self.phase is Phase.LOADING_MODEL:
            self.phase = Phase.WAITING_FOR_REPLICA

    def retry_unstarted(self, reason: str) -> None:
        """Its call was lost before a replica started it (routing failed, the replica died
        while it waited): back to the queue, and the attempt counts."""
        self._require(JobStatus.QUEUED, "retry")
        self.attempts += 1
        self.phase = Phase.RETRYING
        self.retry_reason = reason

    # -- the main line ---------------------------------------------------------------

    def start(self, now_ms: int, replica: str | None = None) -> None:
        self._require(JobStatus.QUEUED, "start")
        self.status = JobStatus.PROCESSING
        self.started_at_ms = now_ms
        self.attempts += 1
        self.replica = replica
        self.phase = Phase.GENERATING
        self.retry_reason = None

    def report_progress(self, step: int, total: int, preview: Preview | None = None,
                        phase: str = "") -> None:
        """`phase` "hires": the step is in the second pass of a hires fix (`step` and
        `total` count both passes)."""
        self._require(JobStatus.PROCESSING, "report progress on")
        if phase == Phase.HIRES:
            self.phase = Phase.HIRES
        if total > 0:
            # 100 is reserved for "completed": a finished denoise still has to decode.
            self.progress = max(self.progress, min(99, (100 * step) // total))
        if preview is not None:
            self.preview = preview

    def requeue(self, reason: str) -> None:
        """Back to the queue after its replica died (or the service restarted) while it
        ran; the attempt stays counted."""
        self._require(JobStatus.PROCESSING, "requeue")
        self.status = JobStatus.QUEUED
        self.started_at_ms = None
        self.progress = 0
        self.replica = None
        self.preview = None
        self.phase = Phase.RETRYING
        self.retry_reason = reason

    def complete(self, result: JobResult, now_ms: int) -> None:
        self._require(JobStatus.PROCESSING, "complete")
        self.status = JobStatus.COMPLETED
        self.result = result
        self.progress = 100
        self._end(now_ms)

    def fail(self, error: str, now_ms: int, *, lost_attempt: bool = False) -> None:
        """Ends the job as failed. `lost_attempt`: a try that was lost before a replica
        started it counts as an attempt (as `retry_unstarted` does)."""
        self._require_unfinished("fail")
        if lost_attempt and self.status is JobStatus.QUEUED:
            self.attempts += 1
        self.status = JobStatus.FAILED
        self.error = error
        self._end(now_ms)

    def cancel(self, now_ms: int) -> None:
        self._require_unfinished("cancel")
        # progress stays where the job stopped
        self.status = JobStatus.CANCELLED
        self._end(now_ms)

    def _end(self, now_ms: int) -> None:
        self.completed_at_ms = now_ms
        self.phase = None
        self.retry_reason = None
        self.preview = None
        self.task = None  # a finished job never runs again; drop its input images

    def _require(self, expected: JobStatus, action: str) -> None:
        if self.status is not expected:
            raise IllegalTransition(
                f"cannot {action} job {self.id}: it is {self.status}, not {expected}"
            )

    def _require_unfinished(self, action: str) -> None:
        if self.status.is_terminal():
            raise IllegalTransition(f"cannot {action} job {self.id}: it is already {self.status}")

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
            out["phase"] = self.phase.value
        if self.retry_reason is not None:
            out["retryReason"] = self.retry_reason
        if queue_position is not None:
            out["queuePosition"] = queue_position
        if self.started_at_ms is not None:
            out["startedAt"] = iso(self.started_at_ms)
        if self.completed_at_ms is not None:
            out["completedAt"] = iso(self.completed_at_ms)
        if self.preview is not None:
            out["preview"] = self.preview.to_wire()
        if self.result is not None:
            out["result"] = self.result.to_wire()
        if self.error is not None:
            out["error"] = self.error
        if self.attempts:
            out["attempts"] = self.attempts
        if self.webhook is not None:
            out["webhook"] = self.webhook.to_wire()
        return out
