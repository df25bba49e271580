"""Input images built in memory for tests, request bodies of the image modes, and the
table of bad input images every route must refuse with a 400 naming the field."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

STEPS = 4  # enough denoising to change every pixel; small enough to stay fast on a CPU
INPAINT_BOX = (16, 16, 48, 40)  # left, top, right (exclusive), bottom (exclusive)


# -- images ----------------------------------------------------------------


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image where nearly every pixel differs from its neighbours."""
    x = np.arange(width, dtype=np.uint16)[None, :]
    y = np.arange(height, dtype=np.uint16)[:, None]
    r = (x * 255 // max(1, width - 1)) * np.ones_like(y)
    g = (y * 255 // max(1, height - 1)) * np.ones_like(x)
    b = (x * 7 + y * 13) % 256
    rgb = np.stack([r, g, b], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def stripes(width: int, height: int, colours: tuple[str, str], period: int = 8) -> Image.Image:
    image = Image.new("RGB", (width, height), colours[0])
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 2 * period):
        draw.rectangle((x, 0, x + period - 1, height - 1), fill=colours[1])
    return image


def centre_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black (keep) with a white (repaint) rectangle; `box` right/bottom are exclusive."""
    mask = Image.new("L", (width, height), 0)
    left, top, right, bottom = box
    ImageDraw.Draw(mask).rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def bare_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri_of(data: bytes) -> str:
    return "data:image/png;base64," + bare_b64(data)


def data_uri(image: Image.Image) -> str:
    return data_uri_of(encode(image))


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


# -- request bodies ------------------------------------------------------------------------


def img2img(**body: Any) -> dict[str, Any]:
    return {"prompt": "a watercolour lake", "initImage": data_uri(gradient(64, 64)),
            "strength": 0.6, "steps": STEPS, "seed": 11} | body


def inpaint(**body: Any) -> dict[str, Any]:
    return {"prompt": "a red car", "image": data_uri(gradient(64, 64)),
            "mask": data_uri(centre_mask(64, 64, INPAINT_BOX)), "steps": STEPS,
            "seed": 3} | body


def style(**body: Any) -> dict[str, Any]:
    return {"contentImage": data_uri(gradient(64, 64)),
            "styleImage": data_uri(stripes(64, 64, ("navy", "orange"))),
            "steps": STEPS, "seed": 21} | body


# -- bad input images --------------------------------------------------------------------


def _truncated_png() -> str:
    data = encode(gradient(64, 64))
    return bare_b64(data[: len(data) // 2])


def _decompression_bomb() -> str:
    # serve_app/settings.py Limits.max_input_pixels is 4096*4096 = 16,777,216; this header
    # says 17,640,000 pixels in a file of a few KB (1 bit per pixel, all zero).
    image = Image.new("1", (4200, 4200), 0)
    data = encode(image)
    assert len(data) < 16 * 1024
    return data_uri_of(data)


def _gif(image: Image.Image) -> str:
    return bare_b64(encode(image, "GIF"))


# case id: (mode, the field the error must name, what it must say, request body)
BAD_INPUTS: dict[str, tuple[str, str, str, Callable[[], dict[str, Any]]]] = {
    "initImage not base64": (
        "img2img", "initImage", "not valid base64",
        lambda: img2img(initImage="this is *not* base64!")),
    "initImage not an image": (
        "img2img", "initImage", "not a PNG, JPEG or WebP image",
        lambda: img2img(initImage=bare_b64(b"just some text, no picture here" * 4))),
    "initImage a GIF": (
        "img2img", "initImage", "GIF images are not accepted",
        lambda: img2img(initImage=_gif(gradient(64, 64)))),
    "initImage a truncated PNG": (
        "img2img", "initImage", "truncated or corrupt",
        lambda: img2img(initImage=_truncated_png())),
    "initImage a decompression bomb": (
        "img2img", "initImage", "4200x4200 (17640000 pixels), over the limit of 16777216",
        lambda: img2img(initImage=_decompression_bomb())),
    "strength over 1": (
        "img2img", "strength", "between 0 and 1 (got 1.5)", lambda: img2img(strength=1.5)),
    "mask all black": (
        "inpaint", "mask", "entirely black",
        lambda: inpaint(mask=data_uri(Image.new("L", (64, 64), 0)))),
    "mask of another aspect ratio": (
        "inpaint", "mask", "the mask is 64x32 but the image is 64x64",
        lambda: inpaint(mask=data_uri(centre_mask(64, 32, (8, 8, 24, 24))))),
    "image truncated": (
        "inpaint", "image", "truncated or corrupt", lambda: inpaint(image=_truncated_png())),
    "styleImage a GIF": (
        "style-transfer", "styleImage", "GIF images are not accepted",
        lambda: style(styleImage=_gif(stripes(64, 64, ("red", "blue"))))),
}
