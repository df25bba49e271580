"""The HTTP wire: every request and response body, camelCase as the API document specifies.
(Over ~300 lines: the service's one schema module, a short class per body.)

Request models check types and shapes (`serve_app.api.validation` checks them against the
configured limits and the model registry). Response models describe exactly what the routes
send, so `/openapi.json` documents the real thing; the routes send bodies rendered by the
job layer (`Job.to_wire`, `Job.summary`) without re-validating them on the hot path, and a
test checks those bodies against these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from serve_app.hires_plan import DEFAULT_DENOISING_STRENGTH, DEFAULT_UPSCALER
from serve_app.messages import JobType, OutputFormat, Priority, WebhookEvent


class WireModel(BaseModel):
    """camelCase aliases, snake_case names accepted too, strict types, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
    )


Number = Annotated[float, Field(allow_inf_nan=False)]


class LoraRef(WireModel):
    """One of the model's LoRAs (`GET /models`: `loras`) and its scale (0 = no effect)."""

    name: str
    scale: Number = 1.0


class ControlNetRef(WireModel):
    """A ControlNet of the model (`GET /models`: `controlNets`) steering the denoiser with
    `image` (base64 or a data URI), after `canny` edge detection or as is (`none`)."""

    model: str
    image: str
    conditioning_scale: Number = 1.0
    preprocess: Literal["none", "canny"] = "none"


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
    preview: bool = Field(False, description="Show a thumbnail of the image forming in the "
                          "record (`preview`) every `previewEvery` steps while it runs")
    preview_every: int | None = Field(None, description="Steps between thumbnails "
                                      "(default: about eight per job)")
    # Where to POST the job's webhooks (Standard Webhooks, signed), and for which events
    # (default: completed, failed, cancelled).
    webhook: str | None = None
    webhook_events: list[Annotated[WebhookEvent, Field(strict=False)]] | None = None
    loras: list[LoraRef] = []
    # text2img and img2img only (validation says so for the other modes).
    control_net: ControlNetRef | None = None


class HiresRequest(WireModel):
    """The hires fix: the image made at `width` x `height` first, then scaled up (`scale`
    times, or to `width` and/or `height` here: one of them keeps the aspect; both, another
    aspect, centre-cropped) and refined by img2img at that size, in the same job. README:
    Hires fix."""

    scale: Number | None = Field(None, description="Times the first pass's size, 1 to 4 "
                                 "(default 2 when no width or height is given)")
    width: int | None = Field(None, description="The final width (instead of scale)")
    height: int | None = Field(None, description="The final height (instead of scale)")
    upscaler: str = Field(
        DEFAULT_UPSCALER, description="latent, latent-antialiased, latent-bicubic, "
        "latent-bicubic-antialiased, latent-nearest, latent-nearest-exact (the latents "
        "scaled), or lanczos, nearest (the decoded image)")
    steps: int | None = Field(None, description="Steps of the second pass, of which it runs "
                              "denoisingStrength x steps (default: the first pass's)")
    denoising_strength: Number = Field(
        DEFAULT_DENOISING_STRENGTH, description="How much the second pass changes, 0 to 1")
    sampler: str | None = Field(None, description="The second pass's sampler (default: the "
                                "first pass's)")


class Text2ImgRequest(GenerationCommon):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "prompt": "A serene lake surrounded by mountains at sunset", "steps": 30,
        "width": 512, "height": 512, "seed": 42}]})

    prompt: str
    hires: HiresRequest | None = None


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


class OutpaintRequest(GenerationCommon):
    """The image on a larger canvas: `left`/`top`/`right`/`bottom` pixels added, the new
    area pre-filled (edges extended and blurred), then inpainted through a mask that also
    covers a `seam` band inside the image, feathered, on the model's inpainting route.
    Pixels outside the new area and the seam are exactly the input's. The output size is
    the image's plus the padding (`right`/`bottom` grow to the model's size multiple);
    `width`/`height` are not taken."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "prompt": "a wide mountain valley", "image": "data:image/png;base64,...",
        "left": 64, "right": 64, "top": 64, "bottom": 64}]})

    prompt: str
    image: str
    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    seam: int = Field(16, description="Width in pixels of the band inside the image that is "
                      "repainted and feathered into the new area (0: a hard edge)")
    inpainting_strength: Number = 1.0


class UpscaleRequest(WireModel):
    """An image made larger by `upscaler` (`GET /upscalers`: `lanczos`, `nearest`, or a model
    upscaler of the registry): by `scale`, or to `width` x `height` (one of the two given:
    the other keeps the aspect ratio). Runs as a job on `model`'s replica (default: the
    default model's), like the generate routes."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "image": "data:image/png;base64,...", "scale": 2, "upscaler": "lanczos"}]})

    image: str
    scale: Number | None = None
    width: int | None = None
    height: int | None = None
    upscaler: str = "lanczos"
    model: str | None = None
    output_format: Annotated[OutputFormat, Field(strict=False)] = OutputFormat.PNG
    quality: int = 95
    priority: Annotated[Priority, Field(strict=False)] = Priority.NORMAL
    webhook: str | None = None
    webhook_events: list[Annotated[WebhookEvent, Field(strict=False)]] | None = None


REQUEST_MODELS: dict[JobType, type[WireModel]] = {
    JobType.TEXT2IMG: Text2ImgRequest,
    JobType.IMG2IMG: Img2ImgRequest,
    JobType.INPAINT: InpaintRequest,
    JobType.STYLE_TRANSFER: StyleTransferRequest,
    JobType.OUTPAINT: OutpaintRequest,
    JobType.UPSCALE: UpscaleRequest,
}

# Request fields holding objects: unknown keys inside them are reported against these.
NESTED_MODELS: dict[str, type[WireModel]] = {"loras": LoraRef, "control_net": ControlNetRef,
                                              "hires": HiresRequest}

# Request fields that carry images: kept out of job records (a record echoes a short
# description instead of megabytes of base64).
IMAGE_FIELDS: tuple[str, ...] = ("init_image", "image", "mask", "content_image", "style_image")
# Request fields the record shows in its `webhook` section, not in its request echo.
WEBHOOK_FIELDS: tuple[str, ...] = ("webhook", "webhook_events")


# -- responses --------------------------------------------------------------------------


class Reply(BaseModel):
    """A response body: camelCase, nothing beyond what is declared."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


JobStatusName = Literal["queued", "processing", "completed", "failed", "cancelled"]
PhaseName = Literal["queued", "loading_model", "waiting_for_replica", "generating", "hires",
                    "retrying"]


class ErrorBody(Reply):
    error: str = Field(description="What is wrong and how to fix it")


class JobResultBody(Reply):
    images: list[str] = Field(description="Data URIs, one per image")
    seed: int | None
    seeds: list[int]
    parameters: dict[str, Any]
    time_taken: int = Field(description="Milliseconds from start to completion")
    content_type: str
    nsfw: list[bool] | None = Field(
        None, description="Per image: the safety checker flagged it (and it was replaced by a "
        "black image). Present whenever a checker ran (ENABLE_NSFW_FILTER and a model that "
        "has one), absent otherwise")


class PreviewBody(Reply):
    step: int = Field(description="The denoising step it shows")
    image: str = Field(description="A JPEG data URI, at most 128 px on its longer side")


WebhookEventName = Literal["started", "progress", "completed", "failed", "cancelled"]


class WebhookDelivery(Reply):
    event: WebhookEventName
    id: str = Field(description="The webhook-id header: the same on every attempt")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status: int | None = Field(None, description="HTTP status of the last attempt")
    last_error: str | None = Field(None, description="Why the last attempt got no status")
    next_attempt_at: str | None = None


class WebhookInfo(Reply):
    url: str
    events: list[WebhookEventName]
    deliveries: list[WebhookDelivery]


class JobRecord(Reply):
    """GET /jobs/:id, and the answer to a submit (202)."""

    id: str = Field(examples=["job_1764180000000_k2j4h5g6f"])
    type: JobType
    status: JobStatusName
    request: dict[str, Any] = Field(description="The request as run, defaults filled in")
    model: str
    priority: Priority
    created_at: str
    progress: int = Field(ge=0, le=100)
    phase: PhaseName | None = None
    retry_reason: str | None = None
    queue_position: int | None = Field(
        None, description="1 = next; 0 = handed to a replica; absent once running")
    started_at: str | None = None
    completed_at: str | None = None
    preview: PreviewBody | None = Field(
        None, description="The latest thumbnail of the image forming (`preview: true`), while "
        "it runs")
    result: JobResultBody | None = None
    error: str | None = None
    attempts: int | None = None
    webhook: WebhookInfo | None = None


class WebhookBody(JobRecord):
    """What a webhook POSTs: the job record at the event (without its `webhook` section),
    with `result.images` as URLs of `GET /jobs/:id/images/:n` instead of data URIs."""

    event: WebhookEventName


class JobSummary(Reply):
    id: str
    type: JobType
    status: JobStatusName
    model: str
    priority: Priority
    progress: int
    created_at: str
    completed_at: str | None = None
    error: str | None = None


class JobList(Reply):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class CancelResult(Reply):
    success: bool
    id: str
    status: JobStatusName


class QueueStatus(Reply):
    queued_jobs: int
    processing_jobs: int
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    average_processing_time: int = Field(description="Mean ms of completed jobs")
    max_queue_size: int


class ModelDefaults(Reply):
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str


class LoraInfo(Reply):
    name: str
    description: str
    format: Literal["diffusers", "kohya"]


class ControlNetInfo(Reply):
    id: str
    description: str


class ModelInfo(Reply):
    id: str
    name: str
    description: str
    type: str
    pipeline: str = Field(description="Model family: sd, sdxl, flux or sd3")
    samplers: list[str] = Field(description="The samplers this model accepts")
    loaded: bool = Field(description="Whether a replica is ready (else a cold start)")
    version: str
    served: bool = Field(description="Whether it is served here: its weights are present and "
                               "it can run on this cluster")
    unavailable: str | None = Field(
        description="Why it is not served on this cluster (it needs a GPU, say), or null")
    device: str = Field(description="Where its replicas run: cuda or cpu (auto: not placed)")
    num_gpus: float = Field(description="GPUs each replica takes")
    replicas: int
    min_replicas: int
    max_replicas: int
    max_batch_size: int
    defaults: ModelDefaults
    default: bool = Field(description="The model a request without `model` gets")
    loras: list[LoraInfo] = Field(description="LoRAs a request may name in `loras`")
    control_nets: list[ControlNetInfo] = Field(
        description="ControlNets a request may name in `controlNet.model`")
    # A pool model's (docs/models.md, model pools); absent for a model of its own.
    pool: str | None = Field(None, description="The model pool whose replicas load it")
    loaded_replicas: int | None = Field(
        None, description="Pool models: on how many of the pool's replicas it is loaded now")
    pool_replicas: int | None = Field(None, description="Pool models: the pool's ready replicas")
    max_models_per_replica: int | None = Field(
        None, description="Pool models: models each pool replica keeps loaded (LRU)")


class ModelList(Reply):
    models: list[ModelInfo]


class UpscalerInfo(Reply):
    name: str
    kind: Literal["resampler", "model"] = Field(
        description="resampler: PIL, no weights; model: a super-resolution network")
    scale: int | None = Field(description="The model's own factor (other factors are reached "
                              "by resampling its output); null for resamplers")
    description: str
    present: bool = Field(description="Whether its weights are on this server")


class UpscalerList(Reply):
    upscalers: list[UpscalerInfo]


class Health(Reply):
    status: Literal["ok"]


class Ready(Reply):
    status: Literal["ready"]
    tracker: Literal["ok"]
    store: Literal["ok"]
