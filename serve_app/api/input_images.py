"""Input images: decode and validate the base64 image fields of a request at the ingress.

Everything here runs before a job exists, so every failure is an `InvalidRequest` whose
message names the wire (camelCase) field and says how to fix it. What passes is re-encoded
as PNG bytes in an `InputImage`: plain data that crosses Ray handles (never a PIL image).

Pillow only; this module is on the ingress side and must not import torch or numpy.
Untrusted input is bounded in this order, each check before the costlier step it guards:
the string length before base64 decoding, the header's pixel count before pixel decoding,
and a full decode inside `try` so truncated or corrupt data is a 400, never a 500.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import InvalidRequest
from serve_app.messages import InputImage
from serve_app.settings import Limits

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
_ACCEPTED_TEXT = "PNG, JPEG or WebP"
_DATA_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp"})
_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>[^,]*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Named only to say what a rejected upload was; never opened.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
)
# Errors Pillow raises on truncated or malformed data while decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = 0x0112  # the EXIF tag; 5 to 8 turn the image a quarter
_TURNED = frozenset({5, 6, 7, 8})
_MASK_ASPECT_TOLERANCE = 0.01
_MASK_THRESHOLD = 128


def decode_input_image(value: object, field: str, limits: Limits) -> InputImage:
    """Decode one image field (`field` is its camelCase wire name) into a validated PNG.

    Accepts a data URI (`data:image/png;base64,...`, also jpeg, jpg and webp) or bare
    base64, whitespace and newlines allowed. Applies the EXIF orientation, flattens any
    transparency onto white and returns RGB. Raises `InvalidRequest` naming `field` for
    anything else: not a string, bad base64, over `limits.max_input_bytes` or
    `limits.max_input_pixels`, not an image, not PNG/JPEG/WebP, truncated or corrupt.
    """
    image = _open_image(value, field, limits)
    rgb = _to_rgb(image)
    return InputImage(png=_encode_png(rgb), width=rgb.width, height=rgb.height)


def decode_mask(value: object, field: str, limits: Limits, image: InputImage) -> InputImage:
    """Decode an inpainting mask for `image`: one channel (L), 0 or 255, at the image's size.

    White marks the area to repaint. A mask with transparency whose colour is uniform
    (a brush stroke on a transparent layer) is read from its alpha; any other transparent
    mask is composited onto black (transparent means keep). A mask whose aspect ratio is
    within 1% of the image's is resized (bilinear) to the image's size; every mask is then
    thresholded at 128. Raises `InvalidRequest` naming `field` for any decoding failure
    (as `decode_input_image`), a different aspect ratio, or a mask that is entirely black.
    """
    mask = _to_mask(_open_image(value, field, limits))
    if mask.size != (image.width, image.height):
        if not _same_aspect(mask.size, (image.width, image.height)):
            raise InvalidRequest(
                f"{field}: the mask is {mask.width}x{mask.height} but the image is "
                f"{image.width}x{image.height}; send a mask with the image's size or at "
                "least its aspect ratio"
            )
        mask = mask.resize((image.width, image.height), Image.Resampling.BILINEAR)
    mask = mask.point(lambda v: 255 if v >= _MASK_THRESHOLD else 0)
    if mask.getextrema()[1] == 0:
        raise InvalidRequest(
            f"{field}: the mask is entirely black; white marks the area to repaint"
        )
    return InputImage(png=_encode_png(mask), width=mask.width, height=mask.height)


def probe_size(value: object, field: str, limits: Limits) -> tuple[int, int]:
    """The image's width and height as it will decode (EXIF orientation applied), read from
    its header only: what the work budget is checked on before any pixel is decoded. The
    same failures as `decode_input_image`'s, but for a truncated or corrupt pixel stream,
    which only the full decode finds."""
    image = _open_header(_decode_base64(value, field, limits), field, limits)
    try:
        turned = image.getexif().get(_ORIENTATION, 1) in _TURNED
    except _DECODE_ERRORS:
        turned = False  # the full decode says what is wrong with it
    return (image.height, image.width) if turned else (image.width, image.height)


def open_image(value: object, field: str, limits: Limits) -> Image.Image:
    """The image of a base64 field (bare or data URI), decoded under the same bounds as
    `decode_input_image` but as it is (alpha kept): for adapters that read a mask from
    an image's alpha (`serve_app.api.compat`)."""
    return _eight_bit(_open_image(value, field, limits))


def round_to_multiple(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """`(width, height)` each rounded down to a multiple of `multiple`, never below it."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return (
        max(multiple, width // multiple * multiple),
        max(multiple, height // multiple * multiple),
    )


def describe(image: InputImage) -> dict[str, Any]:
    """A short JSON-safe stand-in for an image in job records (instead of its base64)."""
    return {"width": image.width, "height": image.height, "bytes": len(image.png)}


def _decode_base64(value: object, field: str, limits: Limits) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(
            f"{field}: must be a non-empty string holding a base64-encoded PNG, JPEG or "
            "WebP image, bare or as a data URI (data:image/png;base64,...)"
        )
    text = value.strip()
    match = _DATA_URI.match(text)
    if match:
        mime = match["mime"].strip().lower()
        if mime not in _DATA_MIME_TYPES:
            raise InvalidRequest(
                f"{field}: data URI type {mime or '(none)'!r} is not accepted; send a "
                f"{_ACCEPTED_TEXT} image (image/png, image/jpeg or image/webp)"
            )
        if "base64" not in match["params"].lower():
            raise InvalidRequest(
                f"{field}: the data URI must be base64-encoded (data:{mime};base64,...)"
            )
        text = text[match.end() :]
    # Cheap bound first: whitespace (line breaks every 76 characters) adds a few percent,
    # so a string over twice the encoded limit is too large whatever it holds.
    if len(text) > 2 * _encoded_length(limits.max_input_bytes) + 1024:
        raise _too_large(field, len(text) * 3 // 4, limits)
    text = _WHITESPACE.sub("", text)
    if len(text) * 3 // 4 - text[-2:].count("=") > limits.max_input_bytes:
        raise _too_large(field, len(text) * 3 // 4, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise InvalidRequest(
            f"{field}: not valid base64; encode the image file's bytes with standard "
            "base64 (A-Z, a-z, 0-9, +, /, with = padding)"
        ) from None
    if not data:
        raise InvalidRequest(f"{field}: the base64 decodes to no bytes; send an image file")
    return data


def _open_image(value: object, field: str, limits: Limits) -> Image.Image:
    """Decode the field, check format and pixel count from the header, then fully load."""
    image = _open_header(_decode_base64(value, field, limits), field, limits)
    try:
        image.load()
        # Inside the try: a corrupt EXIF block fails here rather than at load.
        ImageOps.exif_transpose(image, in_place=True)
    except _DECODE_ERRORS:
        raise _corrupt(field) from None
    return image


def _open_header(data: bytes, field: str, limits: Limits) -> Image.Image:
    """The image opened (its header read, no pixel decoded), format and pixel count checked."""
    try:
        # Pillow warns (or raises, past twice the limit) on huge headers during open; make
        # both an exception here, locally, so a bomb is a 400 and never leaks a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        # Pillow's own bound (Image.MAX_IMAGE_PIXELS) tripped before ours could be checked.
        limit = min(limits.max_input_pixels, Image.MAX_IMAGE_PIXELS or limits.max_input_pixels)
        raise InvalidRequest(
            f"{field}: the image has too many pixels (the limit is {limit}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(_unrecognised(field, data)) from None
    except _DECODE_ERRORS:
        raise _corrupt(field) from None
    pixels = image.width * image.height
    if pixels > limits.max_input_pixels:
        raise InvalidRequest(
            f"{field}: the image is {image.width}x{image.height} ({pixels} pixels), over "
            f"the limit of {limits.max_input_pixels} pixels; send a smaller image"
        )
    if pixels == 0:
        raise _corrupt(field)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    image = _eight_bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_mask(image: Image.Image) -> Image.Image:
    image = _eight_bit(image)
    if not _has_alpha(image):
        return image if image.mode == "L" else image.convert("L")
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if all(low == high for low, high in rgba.convert("RGB").getextrema()):
        return alpha
    flat = Image.new("L", rgba.size, 0)
    flat.paste(rgba.convert("L"), mask=alpha)
    return flat


def _eight_bit(image: Image.Image) -> Image.Image:
    # 16-bit greyscale PNGs open as I or I;16; a plain convert would clip, not scale.
    if image.mode.startswith("I"):
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    ratio_a, ratio_b = a[0] / a[1], b[0] / b[1]
    return abs(ratio_a - ratio_b) <= _MASK_ASPECT_TOLERANCE * ratio_b


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: these bytes only travel to a replica and are decoded once.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encoded_length(size: int) -> int:
    return (size + 2) // 3 * 4


def _too_large(field: str, size: int, limits: Limits) -> InvalidRequest:
    return InvalidRequest(
        f"{field}: the image is about {size} bytes, over the limit of "
        f"{limits.max_input_bytes} bytes; send a smaller or more compressed image"
    )


def _unrecognised(field: str, data: bytes) -> str:
    other = next((name for magic, name in _OTHER_MAGIC if data.startswith(magic)), None)
    if other:
        return f"{field}: {other} images are not accepted; send a {_ACCEPTED_TEXT} image"
    return f"{field}: the data is not a {_ACCEPTED_TEXT} image; send one of those formats"


def _corrupt(field: str) -> InvalidRequest:
    return InvalidRequest(
        f"{field}: the image data is truncated or corrupt; re-export it as {_ACCEPTED_TEXT} "
        "and send the whole file"
    )
