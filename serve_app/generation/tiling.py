"""Tiled upscaling with overlap and blending, in bounded memory (numpy + PIL, no torch).

A model upscaler's activations grow with the image (a real ESRGAN at x4 holds several
64-channel maps of the *output* size), so a large image is cut into tiles of `tile` input
pixels, each run with `overlap` pixels of context on every inner side. Each tile's output is
resized to the target scale (when the target is not the model's own scale) and blended into
the output: across every inner seam the weight moves linearly from the old tile to the new
one over a band `overlap` pixels wide (input pixels), centred on the seam; a tile writes
its core and half the overlap on each side, so every pixel it contributes to lies at least
`overlap / 2` input pixels inside it. Such a pixel sees all the context it would see
untiled, so a model whose receptive radius is at most `overlap / 2` gives exactly the
untiled image
(`tests/unit/test_upscalers.py` checks it); a deeper one (a real ESRGAN) differs only
slightly in the seam bands, with no visible edge.

Memory: the input, the output (uint8, target size) and ONE tile's model call at a time;
nothing else grows with the image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from PIL import Image

# uint8 H x W x 3 -> uint8 (H*scale) x (W*scale) x 3
TileModel = Callable[[np.ndarray], np.ndarray]
TileProgress = Callable[[int, int], bool]  # (done, total) -> stop?


class Stopped(Exception):
    """The progress callback asked to stop between tiles."""


def spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Core intervals of at most `tile` covering [0, length)."""
    count = max(1, -(-length // tile))
    edges = [round(i * length / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def upscale_tiled(image: np.ndarray, model: TileModel, model_scale: int,
                  size: tuple[int, int], *, tile: int, overlap: int,
                  progress: TileProgress | None = None) -> np.ndarray:
    """`image` (uint8 H x W x 3) through `model` tile by tile, resized to `size`
    (width, height), blended across seams. See the module docstring."""
    height, width = image.shape[:2]
    out_w, out_h = size
    out = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    rows, cols = spans(height, tile), spans(width, tile)
    total, done = len(rows) * len(cols), 0
    for cy0, cy1 in rows:
        for cx0, cx1 in cols:
            ey0, ey1 = max(0, cy0 - overlap), min(height, cy1 + overlap)
            ex0, ex1 = max(0, cx0 - overlap), min(width, cx1 + overlap)
            result = model(np.ascontiguousarray(image[ey0:ey1, ex0:ex1]))
            _blend(out, result, model_scale, (ex0, ey0, ex1, ey1), (cx0, cy0, cx1, cy1),
                   (width, height), overlap)
            done += 1
            if progress is not None and progress(done, total) and done < total:
                raise Stopped(f"stopped after {done} of {total} tiles")
    return out


def _blend(out: np.ndarray, result: np.ndarray, model_scale: int,
           ext: tuple[int, int, int, int], core: tuple[int, int, int, int],
           src: tuple[int, int], overlap: int) -> None:
    """Blend one tile's output into `out`: over its core and half the overlap on each
    side (beyond that its pixels lack context; the neighbour's band covers them)."""
    ex0, ey0, _, _ = ext
    width, height = src
    out_h, out_w = out.shape[:2]
    sx, sy = out_w / width, out_h / height
    half = overlap / 2
    x0, x1 = round(max(0, core[0] - half) * sx), round(min(width, core[2] + half) * sx)
    y0, y1 = round(max(0, core[1] - half) * sy), round(min(height, core[3] + half) * sy)
    if sx == sy == model_scale:
        ox, oy = x0 - ex0 * model_scale, y0 - ey0 * model_scale
        result = result[oy:oy + y1 - y0, ox:ox + x1 - x0]
    else:
        # The window's target pixels, sampled from the tile's model output (whose pixel
        # (0, 0) is input pixel (ex0, ey0) at the model's scale).
        box = ((x0 / sx - ex0) * model_scale, (y0 / sy - ey0) * model_scale,
               (x1 / sx - ex0) * model_scale, (y1 / sy - ey0) * model_scale)
        result = np.asarray(Image.fromarray(result).resize(
            (x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=box))
    wx = _ramp(x0, x1, sx, core[0], overlap)
    wy = _ramp(y0, y1, sy, core[1], overlap)
    weight = wy[:, None] * wx[None, :]
    region = out[y0:y1, x0:x1]
    if (weight >= 1).all():
        region[...] = result
        return
    mixed = region * (1 - weight[..., None]) + result * weight[..., None]
    region[...] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _ramp(start: int, stop: int, scale: float, seam: int, overlap: int) -> np.ndarray:
    """The new tile's weight along one axis: 0 before the band around the seam at input
    coordinate `seam`, linear across it, 1 after (1 everywhere for a tile at the edge)."""
    if seam == 0 or overlap == 0:
        return np.ones(stop - start)
    centres = (np.arange(start, stop) + 0.5) / scale  # target pixel centres, input coords
    return np.clip((centres - (seam - overlap / 2)) / overlap, 0.0, 1.0)
