"""What each route is sent: paths, camelCase bodies and query strings, input images as data
URIs. Shared by the sync and async clients, which differ only in how they send it."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote

if TYPE_CHECKING:
    from typing import TypeAlias

    from PIL.Image import Image

    from imagegen.results import Job

    # A data URI or else a file path; a path; encoded PNG/JPEG/WebP bytes; a PIL image.
    ImageInput: TypeAlias = str | os.PathLike[str] | bytes | Image

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


class GenerationOptions(TypedDict, total=False):
    """Options every mode takes; a left-out option gets the model's default."""

    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    model: str
    num_images: int
    output_format: str  # png, jpeg or webp
    quality: int
    priority: str  # low, normal or high
    loras: list[dict[str, Any]]  # [{"name": ..., "scale": ...}], names from GET /models
    control_net: dict[str, Any]  # {"model", "image" (data URI), "conditioningScale", "preprocess"}
    preview: bool  # Job.preview shows the image forming while it runs (see watch())
    preview_every: int
    webhook: str  # where the service POSTs signed job events
    webhook_events: list[str]  # started, progress, completed, failed, cancelled


class UpscaleOptions(TypedDict, total=False):
    """What an upscale takes besides the image, the size and the upscaler."""

    model: str  # whose replica runs it (default: the default model)
    output_format: str
    quality: int
    priority: str
    webhook: str
    webhook_events: list[str]


class HiresOptions(TypedDict, total=False):
    """text2img's hires fix: made at width x height, then scaled up and refined in the
    same job. A left-out option gets the service's default (scale 2, upscaler latent,
    denoising strength 0.7, the first pass's steps and sampler)."""

    scale: float  # 1 to 4; or width and/or height (the final size)
    width: int
    height: int
    upscaler: str  # latent, latent-antialiased, latent-bicubic, ..., lanczos, nearest
    steps: int
    denoising_strength: float
    sampler: str


@dataclass(frozen=True)
class Call:
    """One HTTP request, before it is sent."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _path_id(job: str | Job) -> str:
    """A job id from an id or a `Job`; quoted for use in a path."""
    return quote(job if isinstance(job, str) else job.id, safe="")


def data_uri(image: ImageInput) -> str:
    """An input image as a data URI: `image` may be a data URI, a path, bytes or PIL image."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"an image must be a path, bytes, a data URI or a PIL image, "
                        f"not {type(image).__name__}")
    return f"data:{_content_type(data)};base64,{base64.b64encode(data).decode()}"


def _content_type(data: bytes) -> str:
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    # Anything else goes as it is: the service names what it accepts.
    return "application/octet-stream"


def submit(route: str, fields: dict[str, Any], options: GenerationOptions,
           idempotency_key: str | None) -> Call:
    body = {camel(k): v for k, v in {**options, **fields}.items() if v is not None}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", f"/generate/{route}", json=body, headers=headers)


def text2img(prompt: str, options: GenerationOptions, key: str | None,
             hires: HiresOptions | None = None) -> Call:
    fields: dict[str, Any] = {"prompt": prompt}
    if hires is not None:
        fields["hires"] = {camel(k): v for k, v in hires.items() if v is not None}
    return submit("text2img", fields, options, key)


def img2img(image: ImageInput, prompt: str, strength: float | None, options: GenerationOptions,
            key: str | None) -> Call:
    fields = {"prompt": prompt, "init_image": data_uri(image), "strength": strength}
    return submit("img2img", fields, options, key)


def inpaint(image: ImageInput, mask: ImageInput, prompt: str, strength: float | None,
            options: GenerationOptions, key: str | None) -> Call:
    fields = {"prompt": prompt, "image": data_uri(image), "mask": data_uri(mask),
              "inpainting_strength": strength}
    return submit("inpaint", fields, options, key)


def style_transfer(content: ImageInput, style: ImageInput, prompt: str | None,
                   style_strength: float | None, content_strength: float | None,
                   options: GenerationOptions, key: str | None) -> Call:
    fields = {"content_image": data_uri(content), "style_image": data_uri(style),
              "prompt": prompt, "style_strength": style_strength,
              "content_strength": content_strength}
    return submit("style-transfer", fields, options, key)


def outpaint(image: ImageInput, prompt: str, pads: tuple[int, int, int, int],
             seam: int | None, strength: float | None, options: GenerationOptions,
             key: str | None) -> Call:
    left, top, right, bottom = pads
    fields = {"prompt": prompt, "image": data_uri(image), "left": left, "top": top,
              "right": right, "bottom": bottom, "seam": seam, "inpainting_strength": strength}
    return submit("outpaint", fields, options, key)


def upscale(image: ImageInput, scale: float | None, width: int | None, height: int | None,
            upscaler: str | None, options: UpscaleOptions, key: str | None) -> Call:
    fields = {"image": data_uri(image), "scale": scale, "width": width, "height": height,
              "upscaler": upscaler}
    return submit("upscale", fields, options, key)  # type: ignore[arg-type]


def upscalers() -> Call:
    return Call("GET", "/upscalers")


def get(job: str | Job) -> Call:
    return Call("GET", f"/jobs/{_path_id(job)}")


def image(job: str | Job, index: int) -> Call:
    return Call("GET", f"/jobs/{_path_id(job)}/images/{int(index)}")


def events(job: str | Job) -> Call:
    return Call("GET", f"/jobs/{_path_id(job)}/events")


def cancel(job: str | Job) -> Call:
    return Call("POST", f"/jobs/{_path_id(job)}/cancel")


def jobs(status: str | None, type: str | None, model: str | None, limit: int | None,
         cursor: str | None) -> Call:
    query = {"status": status, "type": type, "model": model, "cursor": cursor,
             "limit": None if limit is None else str(limit)}
    return Call("GET", "/jobs", params={k: str(v) for k, v in query.items() if v is not None})


def queue_status() -> Call:
    return Call("GET", "/queue/status")


def models() -> Call:
    return Call("GET", "/models")
