"""The OpenAI Images API in our terms: its request fields to our generate request body, and
a finished job to its `{"created", "data": [...]}` answer. Pure functions (no I/O but
Pillow on the ingress side), so each rule is a unit test.

Fields, as the official `openai` client sends them: `prompt`, `model`, `n`, `size`
("WxH" or "auto"), `response_format` (`b64_json` or `url`), `output_format`,
`output_compression`, `stream` (false only); every other OpenAI field (`quality`, `style`,
`user`, `background`, `moderation`, ...) is accepted and ignored. Our extras, sent with
`extra_body`: `negative_prompt`, `seed`, `steps`, `guidance_scale` (or `cfg_scale`),
`sampler`, `priority`, `strength` (edits and variations).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from serve_app.api.compat.dialects import DialectError
from serve_app.api.input_images import open_image
from serve_app.messages import JobType
from serve_app.settings import Limits

# OpenAI's own model names: a client that cannot be told another (or was never asked)
# gets the server's default model.
OPENAI_MODELS = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini",
                           "gpt-image-1.5", "chatgpt-image-latest"})
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}

# Our camelCase field -> the OpenAI parameter it comes from (validation messages and
# `param` in errors speak the client's words).
FIELD_NAMES = {
    "prompt": "prompt", "Prompt": "prompt", "negativePrompt": "negative_prompt",
    "width": "size", "height": "size", "numImages": "n", "steps": "steps", "seed": "seed",
    "guidanceScale": "guidance_scale", "initImage": "image", "image": "image",
    "mask": "mask", "quality": "output_compression", "strength": "strength",
    "inpaintingStrength": "strength", "sampler": "sampler", "priority": "priority",
    "outputFormat": "output_format",
}
# Our extras: the names a client may send -> (our field, type).
EXTRAS: dict[str, tuple[str, type]] = {
    "negative_prompt": ("negativePrompt", str), "negativePrompt": ("negativePrompt", str),
    "seed": ("seed", int), "steps": ("steps", int),
    "guidance_scale": ("guidanceScale", float), "guidanceScale": ("guidanceScale", float),
    "cfg_scale": ("guidanceScale", float),
    "sampler": ("sampler", str), "priority": ("priority", str),
}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class ImageRequest:
    """A request's fields in our terms, before any input image is decoded."""

    body: dict[str, Any]
    response_format: str | None
    strength: float | None = None


def parse_fields(fields: Mapping[str, Any], *, needs_prompt: bool = True) -> ImageRequest:
    """The fields every images endpoint shares, checked and translated. Multipart fields
    arrive as strings and are converted here too."""
    body: dict[str, Any] = {"outputFormat": "png"}
    prompt = fields.get("prompt")
    if needs_prompt:
        if not isinstance(prompt, str) or not prompt.strip():
            raise DialectError("Missing required parameter: 'prompt'.", param="prompt",
                               code="missing_required_parameter")
        body["prompt"] = prompt
    model = fields.get("model")
    if model not in (None, "") and _text(fields, "model") not in OPENAI_MODELS:
        body["model"] = model
    n = _value(fields, "n", int)
    if n is not None:
        body["numImages"] = n
    size = fields.get("size")
    if size not in (None, "", "auto"):
        match = _SIZE.match(str(size))
        if not match:
            raise DialectError(f"Invalid value for 'size': {size!r}. Use 'WIDTHxHEIGHT' such "
                               "as '512x512', or 'auto'.", param="size", code="invalid_value")
        body["width"], body["height"] = int(match[1]), int(match[2])
    response_format = fields.get("response_format")
    if response_format in (None, ""):
        response_format = None
    elif _text(fields, "response_format") not in RESPONSE_FORMATS:
        raise DialectError(f"Invalid value for 'response_format': {response_format!r}. Use "
                           "'b64_json' or 'url'.", param="response_format", code="invalid_value")
    output_format = fields.get("output_format")
    if output_format not in (None, ""):
        if _text(fields, "output_format") not in OUTPUT_FORMATS:
            raise DialectError(f"Invalid value for 'output_format': {output_format!r}. Use "
                               "'png', 'jpeg' or 'webp'.", param="output_format",
                               code="invalid_value")
        body["outputFormat"] = OUTPUT_FORMATS[output_format]
    compression = _value(fields, "output_compression", int)
    if compression is not None:
        body["quality"] = max(1, compression)
    if _flag(fields, "stream"):
        raise DialectError("Streaming image generation is not supported by this server; "
                           "send stream=false or leave it out.", param="stream",
                           code="unsupported_value")
    for name, (ours, kind) in EXTRAS.items():
        value = _value(fields, name, kind)
        if value is not None:
            body[ours] = value
    return ImageRequest(body, response_format, _value(fields, "strength", float))


def edit_job(req: ImageRequest, image: bytes, mask: bytes | None,
             limits: Limits) -> tuple[JobType, dict[str, Any]]:
    """`POST /v1/images/edits`: inpainting where the mask (or, without one, the image
    itself) is transparent, as OpenAI defines it; img2img for an opaque image without
    a mask. A mask without an alpha channel is read as ours: white marks the area to
    repaint. Decodes images: run it off the event loop."""
    encoded = _b64(image)
    if mask is not None:
        picture = open_image(_b64(mask), "mask", limits)
        repaint = _transparent(picture) if _has_alpha(picture) else picture.convert("L")
        if repaint is None or repaint.getextrema()[1] < 128:
            raise DialectError(
                "The mask marks nothing to edit: its fully transparent areas (or, for a mask "
                "without transparency, its white areas) are where the image is edited.",
                param="mask", code="invalid_value")
    else:
        repaint = _transparent(open_image(encoded, "image", limits))
        if repaint is None:
            return variation_job(req, image)
    body = {**req.body, "image": encoded, "mask": _png_b64(repaint)}
    if req.strength is not None:
        body["inpaintingStrength"] = req.strength
    return JobType.INPAINT, body


def variation_job(req: ImageRequest, image: bytes) -> tuple[JobType, dict[str, Any]]:
    """`POST /v1/images/variations` (and an edit without anything transparent): img2img."""
    body = {**req.body, "initImage": _b64(image)}
    if req.strength is not None:
        body["strength"] = req.strength
    return JobType.IMG2IMG, body


def images_response(record: dict[str, Any], response_format: str | None,
                    urls: list[str] | None, created: int, *, revised_prompt: bool = False
                    ) -> dict[str, Any]:
    """A completed job as OpenAI answers: one entry per image, `b64_json` (the record's
    images as data URIs) or an absolute `url` (`urls`: presigned on an S3 image store, else
    this service's) as asked; both when the client did not say (clients written for either
    work)."""
    data = []
    for index, image in enumerate(record["result"]["images"]):
        item: dict[str, Any] = {}
        if response_format in (None, "b64_json"):
            item["b64_json"] = image.partition(",")[2]
        if response_format in (None, "url") and urls is not None:
            item["url"] = urls[index]
        if revised_prompt:
            item["revised_prompt"] = record["request"].get("prompt", "")
        data.append(item)
    return {"created": created, "data": data}


def model_entry(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "imagegen"}


def _value(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    """The field as `kind`, converting the strings of a multipart form; None if absent."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    if kind is str:
        return _text(fields, name)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _invalid(name, value, kind)
    try:
        number = float(value)
    except ValueError:
        raise _invalid(name, value, kind) from None
    if kind is float:
        return number
    if not number.is_integer():
        raise _invalid(name, value, kind)
    return int(number)


def _text(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise DialectError(f"Invalid type for '{name}': expected a string, got {value!r}.",
                           param=name, code="invalid_type")
    return value


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _invalid(name: str, value: Any, kind: type) -> DialectError:
    word = "an integer" if kind is int else "a number"
    return DialectError(f"Invalid type for '{name}': expected {word}, got {value!r}.",
                        param=name, code="invalid_type")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)


def _transparent(image: Image.Image) -> Image.Image | None:
    """White where `image` is transparent (alpha below 128 after thresholding), else
    black; None when nothing is transparent."""
    if not _has_alpha(image):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] >= 128:
        return None
    return ImageOps.invert(alpha)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return _b64(buffer.getvalue())
