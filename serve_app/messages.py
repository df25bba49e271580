"""What crosses Ray handles: plain dataclasses and enums, no pydantic, no torch.
(Over ~300 lines: the one schema of every message between the deployments, as
`serve_app.api.wire` is the one schema of the HTTP bodies.)

The ingress sends a `Submission` to the tracker; the tracker sends `GenerationTask`s to a
model replica, which streams `Started`, `Progress` and `Finished` events back. Everything
here pickles cheaply; images travel as blob-store keys (`InputImage.key`, `ImageRef`),
never as their bytes once the ingress has stored them (`serve_app.blobs`). The HTTP wire
models (camelCase, pydantic) are in `serve_app.api.wire`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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
    UPSCALE = "upscale"
    OUTPAINT = "outpaint"


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


@dataclass(frozen=True)
class InputImage:
    """A decoded, validated input image, re-encoded as PNG. The ingress stores it in the
    blob store before the job is acknowledged: from then on `key` names it there and `png`
    is empty, so no image bytes travel with the task (`serve_app.blobs`). A replica reads
    it back by its key."""

    png: bytes
    width: int
    height: int
    key: str = ""

    @property
    def size(self) -> int:
        return len(self.png)


@dataclass(frozen=True)
class ImageRef:
    """An image in the blob store: what records and replica results carry instead of its
    bytes. `sha256` is the hex digest of the bytes (the HTTP ETag)."""

    key: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "contentType": self.content_type, "bytes": self.size,
                "width": self.width, "height": self.height, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRef:
        return cls(str(data["key"]), str(data["contentType"]), int(data["bytes"]),
                   int(data["width"]), int(data["height"]), str(data["sha256"]))


@dataclass(frozen=True)
class ControlInput:
    """A task's ControlNet conditioning: the registry id of the net, the control image as
    sent (preprocessed on the replica: `canny` edges, or `none` to use it as is) and how
    strongly it steers the denoiser."""

    model: str
    image: InputImage
    conditioning_scale: float = 1.0
    preprocess: str = "none"


@dataclass(frozen=True)
class UpscalerRef:
    """An upscaler as the replica needs it (`serve_app.model_upscalers.UpscalerSpec.ref`): a
    built-in resampler (`source` "builtin": lanczos, nearest), a weights file under
    MODEL_PATH (`path`), or the seeded tiny ESRGAN (`tiny-esrgan`); tiles in input pixels."""

    name: str
    source: str = "builtin"
    path: str = ""
    seed: int = 0
    tile: int = 256
    tile_overlap: int = 32


@dataclass(frozen=True)
class HiresFix:
    """A text2img task's second pass (`hires`): the first pass's latents (`latent*`
    upscalers) or decoded images (`lanczos`, `nearest`, ...) scaled to `width` x `height`
    (covering it with the first pass's aspect, centre-cropped), then refined by the
    family's img2img pipeline with `steps`, `denoising_strength` and `sampler`. Settled by
    the ingress (`serve_app.api.hires`); run by `serve_app.generation.hires`."""

    width: int
    height: int
    upscaler: str
    steps: int
    denoising_strength: float
    sampler: str

    @property
    def denoising_steps(self) -> int:
        """The steps the second pass runs, as diffusers' img2img counts them (at least 1)."""
        return max(1, min(self.steps, int(self.steps * self.denoising_strength)))


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
    # Registry LoRAs of the model and their scales, by name (one set, one batch key).
    loras: tuple[tuple[str, float], ...] = ()
    control: ControlInput | None = None
    # A latent thumbnail every this many steps (`preview: true`); 0: none.
    preview_every: int = 0
    # upscale: the upscaler (the output is width x height); outpaint: the pixels added on
    # each side and the seam band's width, (left, top, right, bottom, seam), width x height
    # being the padded size.
    upscaler: UpscalerRef | None = None
    outpaint: tuple[int, int, int, int, int] | None = None
    # text2img only: a second, larger pass (`width` x `height` stay the first pass's).
    hires: HiresFix | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the task makes: the hires target, else width x height."""
        if self.hires is not None:
            return self.hires.width, self.hires.height
        return self.width, self.height

    @property
    def work(self) -> float:
        """Megapixel-steps: images x steps x megapixels, both passes of a hires fix."""
        work = self.steps * self.width * self.height / 1e6
        if self.hires is not None:
            work += self.hires.denoising_steps * self.hires.width * self.hires.height / 1e6
        return self.num_images * work

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def batch_key(self) -> tuple[Any, ...] | None:
        """Tasks with equal keys can share one pipeline call (prompts and seeds may
        differ). Only text2img batches: the other modes carry per-job input images, and so
        does a ControlNet job. A batch runs one LoRA set at the same scales, and one hires
        fix (or none)."""
        if self.mode is not JobType.TEXT2IMG or self.control is not None:
            return None
        return (self.mode, self.width, self.height, self.steps, self.sampler,
                self.guidance_scale, self.output_format, self.quality, self.loras, self.hires)


@dataclass(frozen=True)
class GenerationResult:
    """What a replica returns, one image per seed, in seed order: a runner makes `images`
    (encoded bytes); the replica stores them in the blob store and sends only `refs`."""

    images: list[bytes]
    seeds: list[int]
    content_type: str
    nsfw_detected: list[bool] = field(default_factory=list)
    time_taken_ms: int = 0
    model: str = ""
    replica: str = ""
    job_id: str = ""
    refs: tuple[ImageRef, ...] = ()


@dataclass(frozen=True)
class PoolReport:
    """What a pool replica says with a call's `Started`: the models it holds now (the
    call's among them), the seconds this call spent loading its model (None: it was
    loaded already, a hit), and the models it evicted since its last report."""

    loaded: tuple[str, ...]
    load_s: float | None = None
    evicted: tuple[str, ...] = ()


# Events a replica streams back while it works on a task.
@dataclass(frozen=True)
class Started:
    replica: str
    pool: PoolReport | None = None  # from a pool's replica only


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    # JPEG thumbnails of the latents at this step, by job id (`preview: true` jobs).
    previews: dict[str, bytes] = field(default_factory=dict)
    # The pass it counts: "" for a one-pass job, "hires" for a hires fix's second pass
    # (`step` and `total` then count both passes).
    phase: str = ""


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


ReplicaEvent = Started | Progress | Finished
# One item of a replica call's Ray stream: an event, or a batch's results together (every
# item costs the tracker a gRPC read and a deserialization; a batch of 8 was 8 items).
StreamItem = ReplicaEvent | list[Finished]


async def pack(events: AsyncIterator[ReplicaEvent]) -> AsyncIterator[StreamItem]:
    """A replica's events as stream items: consecutive results (a batch's, which come
    one after another once its pipeline call has returned) travel as one list."""
    results: list[Finished] = []
    async for event in events:
        if isinstance(event, Finished):
            results.append(event)
            continue
        if results:
            yield results
            results = []
        yield event
    if results:
        yield results


def unpack(item: StreamItem) -> list[ReplicaEvent]:
    """The events of one stream item, in order."""
    return list(item) if isinstance(item, list) else [item]

@dataclass(frozen=True)
class Caller:
    """Who asks: the API key's name and role, `client`, what rate limits count by (the
    key's name; the client's address when the service runs open, without keys), and the
    highest priority its jobs may ask for."""

    name: str | None
    admin: bool
    client: str
    max_priority: Priority = Priority.HIGH

    def may_see(self, owner: str | None) -> bool:
        return self.admin or owner == self.name


# The one caller of a service without API keys, as in-process tools call it: sees all.
OPEN = Caller(name=None, admin=True, client="local")


class WebhookEvent(StrEnum):
    """What a job's webhook may be sent for (`webhookEvents`)."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.COMPLETED, WebhookEvent.FAILED, WebhookEvent.CANCELLED)


@dataclass(frozen=True)
class WebhookRequest:
    """Where a job's webhooks go and for which events. `base_url` is the service's public
    URL as the ingress saw the submit, so a webhook can link the job's images."""

    url: str
    events: tuple[WebhookEvent, ...]
    base_url: str


@dataclass(frozen=True)
class Submission:
    """A validated request, ready for the tracker: what to run and what to echo back."""

    type: JobType
    model: str
    priority: Priority
    request: dict[str, Any]
    task: GenerationTask
    idempotency_key: str | None = None
    caller: Caller = OPEN
    # A digest of the request, so a reused Idempotency-Key with another body is refused.
    fingerprint: str | None = None
    request_id: str | None = None  # X-Request-ID
    webhook: WebhookRequest | None = None
    # Chosen by the ingress when the job has input images, which it stores under this id
    # before submitting (`serve_app.api.uploads`); the tracker makes one otherwise.
    job_id: str | None = None
    # The caller's submit token was spent at the ingress, before the body was read
    # (`JobTracker.admit`): the tracker does not spend another.
    admitted: bool = False
