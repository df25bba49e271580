"""Outpainting's canvas, mask and composite (numpy + PIL; the inpainting call is `modes`').

- Canvas: the image placed at (left, top) on the padded size; the new area pre-filled by
  extending the image's edge pixels outwards (numpy `edge` padding), then blurred (a
  Gaussian of radius a quarter of the widest padding) so the fill carries the border's
  colours without its streaks. The fill matters to a legacy (4-channel) model and to
  strengths below 1; a 9-channel inpainting model sees the masked image and redraws the
  area anyway. (Noise was the alternative: it makes a 4-channel model paint noise.)
- Mask (what the pipeline repaints): the new area, and a `seam` band inside the image along
  each extended side, so the model blends across the border instead of meeting it.
- Composite (after decoding): generated pixels weighted by `alpha`, 1 in the new area and
  falling linearly to 0 across the seam band, the canvas elsewhere. Where alpha is 0, every
  pixel of the image outside the seam band, the output is the input's, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

Pads = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class Canvas:
    image: Image.Image  # RGB, the padded size
    mask: Image.Image  # L, 255 = repaint (new area + seam band)
    alpha: np.ndarray  # float32 H x W, the generated image's weight in the composite


def prepare(image: Image.Image, pads: Pads, seam: int = 16) -> Canvas:
    left, top, right, bottom = pads
    src = np.asarray(image.convert("RGB"))
    h, w = src.shape[:2]
    filled = np.pad(src, ((top, bottom), (left, right), (0, 0)), mode="edge")
    radius = max(pads) / 4
    if radius > 0:
        blurred = Image.fromarray(filled).filter(ImageFilter.GaussianBlur(radius))
        filled = np.asarray(blurred).copy()
        filled[top:top + h, left:left + w] = src  # the image itself stays as it is
    alpha = _alpha((w, h), pads, seam)
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8))
    return Canvas(Image.fromarray(filled), mask, alpha)


def composite(generated: Image.Image, canvas: Canvas) -> Image.Image:
    """`generated` over the canvas by `alpha`; exactly the canvas where alpha is 0."""
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    base = np.asarray(canvas.image)
    a = canvas.alpha[..., None]
    mixed = np.clip(np.rint(gen * a + base * (1 - a)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(a > 0, mixed, base))


def _alpha(size: tuple[int, int], pads: Pads, seam: int) -> np.ndarray:
    """1 outside the image; inside, 1 - d / (seam + 1) within `seam` pixels of an extended
    side (d: 1 for the pixel at the border), 0 elsewhere."""
    w, h = size
    left, top, right, bottom = pads
    alpha = np.ones((h + top + bottom, w + left + right), dtype=np.float32)
    inner = np.zeros((h, w), dtype=np.float32)
    if seam > 0:
        ramp = 1 - np.arange(1, seam + 1, dtype=np.float32) / (seam + 1)
        xs, ys = np.arange(w), np.arange(h)
        for padded, dist in ((left, xs[None, :]), (right, (w - 1 - xs)[None, :]),
                             (top, ys[:, None]), (bottom, (h - 1 - ys)[:, None])):
            if padded:
                band = np.where(dist < seam, ramp[np.minimum(dist, seam - 1)], 0.0)
                inner = np.maximum(inner, np.broadcast_to(band, (h, w)))
    alpha[top:top + h, left:left + w] = inner
    return alpha
