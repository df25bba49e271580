"""Wire schemas: camelCase on the wire (as the API document specifies), snake_case in Python.

Request models check types and shapes; `serve_app.validation` checks them against the
configured limits and the model registry. The dataclasses at the bottom are what crosses
Ray handles between the tracker and the model replicas: plain data and bytes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Sampler names accepted on the wire. `serve_app.generation.samplers` maps each to a
# diffusers scheduler; a test keeps the two in step.
SAMPLERS: tuple[str, ...] = (
    "euler_a",
    "euler",
    "dpm++_2m",
    "dpm++_2m_karras",
    "ddim",
    "plms",
    "lms",
    "heun",
    "unipc",
)

MAX_SEED = 2**32 - 1


class JobType(StrEnum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    STYLE_TRANSFER = "style-transfer"


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """Smaller runs first."""
        return {"high": 0, "normal": 1, "low": 2}[self.value]


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class WireModel(BaseModel):
    """camelCase aliases, snake_case names accepted too, strict types, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
    )


Number = Annotated[float, Field(allow_inf_nan=False)]


class GenerationCommon(WireModel):
    """Fields every generation mode shares. `None` means "use the model's default"."""

    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: Number | None = None
    seed: int | None = None
    sampler: str | None = None
    model: str | None = None
    num_images: int = 1
    # Enums come as strings in JSON: lax for these two, strict everywhere else.
    output_format: Annotated[OutputFormat, Field(strict=False)] = OutputFormat.PNG
    quality: int = 95
    priority: Annotated[Priority, Field(strict=False)] = Priority.NORMAL


class Text2ImgRequest(GenerationCommon):
    prompt: str


class Img2ImgRequest(GenerationCommon):
    prompt: str
    init_image: str
    strength: Number = 0.75


class InpaintRequest(GenerationCommon):
    prompt: str
    image: str
    mask: str
    inpainting_strength: Number = 1.0


class StyleTransferRequest(GenerationCommon):
    content_image: str
    style_image: str
    prompt: str = ""
    style_strength: Number = 0.7
    content_strength: Number = 0.3


REQUEST_MODELS: dict[JobType, type[GenerationCommon]] = {
    JobType.TEXT2IMG: Text2ImgRequest,
    JobType.IMG2IMG: Img2ImgRequest,
    JobType.INPAINT: InpaintRequest,
    JobType.STYLE_TRANSFER: StyleTransferRequest,
}

# Request fields that carry images: kept out of job records (a record echoes a short
# description instead of megabytes of base64).
IMAGE_FIELDS: tuple[str, ...] = ("init_image", "image", "mask", "content_image", "style_image")


class ModelInfo(WireModel):
    """One entry of GET /models."""

    id: str
    name: str
    description: str
    type: str
    loaded: bool
    version: str
    served: bool
    replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    default_width: int = 512
    default_height: int = 512


class QueueStatus(WireModel):
    queued_jobs: int
    processing_jobs: int
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    average_processing_time: int


@dataclass(frozen=True)
class InputImage:
    """A decoded, validated input image, re-encoded as PNG for the trip to a replica."""

    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class GenerationTask:
    """One pipeline call's worth of work, as the tracker sends it to a model replica."""

    job_id: str
    mode: JobType
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    num_images: int = 1
    strength: float = 1.0
    output_format: OutputFormat = OutputFormat.PNG
    quality: int = 95
    init_image: InputImage | None = None
    mask_image: InputImage | None = None
    style_image: InputImage | None = None
    style_strength: float = 0.0
    content_strength: float = 0.0

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def batch_key(self) -> tuple[Any, ...] | None:
        """Tasks with equal keys can share one pipeline call (prompts and seeds may
        differ). Only text2img batches: the other modes carry per-job input images."""
        if self.mode is not JobType.TEXT2IMG:
            return None
        return (self.mode, self.width, self.height, self.steps, self.sampler,
                self.guidance_scale, self.output_format, self.quality)


@dataclass(frozen=True)
class GenerationResult:
    """What a replica returns: encoded images, one per seed, in seed order."""

    images: list[bytes]
    seeds: list[int]
    content_type: str
    nsfw_detected: list[bool] = field(default_factory=list)
    time_taken_ms: int = 0
    model: str = ""
    replica: str = ""
    job_id: str = ""


# Events a replica streams back while it works on a task.
@dataclass(frozen=True)
class Started:
    replica: str


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


ReplicaEvent = Started | Progress | Finished

JobStatusName = Literal["queued", "processing", "completed", "failed", "cancelled"]


def wire(model: BaseModel) -> dict[str, Any]:
    """A wire model as a camelCase JSON-ready dict."""
    return model.model_dump(by_alias=True, mode="json")


@dataclass(frozen=True)
class Submission:
    """A validated request, ready for the tracker: what to run and what to echo back."""

    type: JobType
    model: str
    priority: Priority
    request: dict[str, Any]
    task: GenerationTask
    idempotency_key: str | None = None
