"""Typed views of the service's JSON: job records, pages, queue statistics, models.

Parsing is lenient on purpose: a field the service adds later is kept in `raw` and
ignored here, a field it leaves out gets its default, so a newer server does not break an
older client.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a `data:<type>;base64,<payload>` URI (or of bare base64)."""
    payload = uri.split(",", 1)[1] if uri.startswith("data:") else uri
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 image: {exc}") from None


def open_image(data: bytes) -> Image:
    """`data` as a loaded PIL image (Pillow is imported only when an image is asked for)."""
    from PIL import Image as PILImage

    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image


@dataclass(frozen=True)
class JobResult:
    """A completed job's output: `images` are data URIs, `seeds` one per image."""

    images: list[str]
    seed: int | None
    seeds: list[int]
    parameters: dict[str, Any]
    time_taken_ms: int | None
    content_type: str | None
    # Per image, whether the safety checker flagged it (None: no checker ran).
    nsfw: list[bool] | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobResult:
        seeds = list(data.get("seeds") or ([data["seed"]] if data.get("seed") is not None else []))
        return cls(
            images=list(data.get("images") or []),
            seed=data.get("seed"),
            seeds=seeds,
            parameters=dict(data.get("parameters") or {}),
            time_taken_ms=data.get("timeTaken"),
            content_type=data.get("contentType"),
            nsfw=data.get("nsfw"),
        )

    def image_bytes(self, index: int = 0) -> bytes:
        """The encoded bytes (PNG, JPEG or WebP) of image `index`."""
        if not self.images:
            raise ValueError("this record carries no images (event-stream records and job "
                             "summaries leave them out: fetch the job with get())")
        return decode_data_uri(self.images[index])

    def image(self, index: int = 0) -> Image:
        """Image `index` as a PIL image."""
        return open_image(self.image_bytes(index))


@dataclass(frozen=True)
class Job:
    """A job record (`GET /jobs/{id}`, a submit's answer, an event) or a summary (`GET /jobs`).

    `queue_position` is 1 for the next job, 0 once handed to a replica; `phase` says what a
    waiting or running job is doing (`queued`, `loading_model`, `generating`, ...).
    """

    id: str
    type: str
    status: JobStatus
    progress: int = 0
    model: str | None = None
    priority: str | None = None
    phase: str | None = None
    queue_position: int | None = None
    error: str | None = None
    attempts: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    request: dict[str, Any] | None = None
    result: JobResult | None = None
    # While it runs with `preview=True`: the latest latent thumbnail, a JPEG data URI.
    preview: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Job:
        result = data.get("result")
        return cls(
            id=str(data["id"]),
            type=str(data.get("type", "")),
            status=JobStatus(data["status"]),
            progress=int(data.get("progress") or 0),
            model=data.get("model"),
            priority=data.get("priority"),
            phase=data.get("phase"),
            queue_position=data.get("queuePosition"),
            error=data.get("error"),
            attempts=data.get("attempts"),
            created_at=_time(data.get("createdAt")),
            started_at=_time(data.get("startedAt")),
            completed_at=_time(data.get("completedAt")),
            request=data.get("request"),
            result=JobResult.from_wire(result) if isinstance(result, dict) else None,
            preview=(data["preview"].get("image") if isinstance(data.get("preview"), dict)
                     else None),
            raw=data,
        )

    @property
    def done(self) -> bool:
        """Finished one way or another: completed, failed or cancelled."""
        return self.status.is_terminal()

    def image_bytes(self, index: int = 0) -> bytes:
        return self._result().image_bytes(index)

    def image(self, index: int = 0) -> Image:
        return self._result().image(index)

    def _result(self) -> JobResult:
        if self.result is None:
            raise ValueError(f"job {self.id} has no result (it is {self.status})")
        return self.result


@dataclass(frozen=True)
class JobPage:
    """One page of `GET /jobs`, newest first; pass `next_cursor` for the next one."""

    jobs: list[Job]
    next_cursor: str | None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobPage:
        return cls([Job.from_wire(j) for j in data.get("jobs", [])], data.get("nextCursor"))


@dataclass(frozen=True)
class QueueStatus:
    queued_jobs: int
    processing_jobs: int
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    average_processing_time_ms: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> QueueStatus:
        return cls(
            queued_jobs=int(data.get("queuedJobs", 0)),
            processing_jobs=int(data.get("processingJobs", 0)),
            completed_jobs=int(data.get("completedJobs", 0)),
            failed_jobs=int(data.get("failedJobs", 0)),
            cancelled_jobs=int(data.get("cancelledJobs", 0)),
            average_processing_time_ms=float(data.get("averageProcessingTime") or 0),
            raw=data,
        )


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `GET /models`; `served` models have weights here, `loaded` ones a
    ready replica (a scale-to-zero model is served but not loaded while idle)."""

    id: str
    name: str
    description: str = ""
    type: str = ""
    version: str = ""
    served: bool = False
    loaded: bool = False
    replicas: int = 0
    default: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", data["id"])),
            description=str(data.get("description", "")),
            type=str(data.get("type", "")),
            version=str(data.get("version", "")),
            served=bool(data.get("served", False)),
            loaded=bool(data.get("loaded", False)),
            replicas=int(data.get("replicas") or 0),
            default=bool(data.get("default", False)),
            defaults=dict(data.get("defaults") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class CancelResult:
    """The answer to a cancel: the job's status after it (normally `cancelled`)."""

    success: bool
    id: str
    status: JobStatus | None

    @classmethod
    def from_wire(cls, data: dict[str, Any], job_id: str) -> CancelResult:
        status = data.get("status")
        return cls(bool(data.get("success", False)), str(data.get("id", job_id)),
                   JobStatus(status) if status else None)
