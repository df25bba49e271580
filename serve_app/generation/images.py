"""Image bytes <-> PIL images for the replica side (PIL only; no torch).

Images cross Ray handles as bytes (house point 9): inputs arrive as `InputImage.png`, results
leave encoded in the task's `OutputFormat`. Masks follow the API: white = repaint,
black = keep; `binarize_mask` makes that an exact two-level decision at 50 % grey, the same
threshold diffusers' mask processor uses.
"""

from __future__ import annotations

import io

from PIL import Image

from serve_app.messages import InputImage, OutputFormat

_PIL_FORMATS: dict[OutputFormat, str] = {
    OutputFormat.PNG: "PNG",
    OutputFormat.JPEG: "JPEG",
    OutputFormat.WEBP: "WEBP",
}
MASK_THRESHOLD = 128


def encode_image(image: Image.Image, fmt: OutputFormat, quality: int = 95) -> bytes:
    """Encode `image` as `fmt`; `quality` (1-100) applies to the lossy formats only."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if fmt is OutputFormat.PNG:
        # compress_level 6 is PIL's default: deterministic bytes for equal pixels.
        rgb.save(buffer, format="PNG", compress_level=6)
    else:
        rgb.save(buffer, format=_PIL_FORMATS[fmt], quality=max(1, min(100, quality)))
    return buffer.getvalue()


def decode_rgb(data: InputImage | bytes) -> Image.Image:
    """An input image as RGB (the ingress has already flattened any transparency)."""
    with Image.open(io.BytesIO(_raw(data))) as img:
        return img.convert("RGB")


def decode_mask(data: InputImage | bytes) -> Image.Image:
    """A mask as single-channel `L` (white = repaint)."""
    with Image.open(io.BytesIO(_raw(data))) as img:
        return img.convert("L")


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resized to exactly `width` x `height` (a no-op when it already is)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def binarize_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    """`mask` resized to the output size and made strictly 0/255 (no feathering)."""
    resized = mask.convert("L")
    if resized.size != (width, height):
        resized = resized.resize((width, height), Image.Resampling.BILINEAR)
    return resized.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def keep_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` where `mask` is white, `original` elsewhere: pixels outside the mask are
    exactly the input's, since the VAE round trip would otherwise alter them slightly."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask)


def _raw(data: InputImage | bytes) -> bytes:
    return data.png if isinstance(data, InputImage) else data
