"""The hires fix's vocabulary and geometry, without torch: what the ingress validates and
the replica (`serve_app.generation.hires`) runs.

Upscalers, as AUTOMATIC1111 names its own (`modules/shared_items`, `latent_upscale_modes`):
- latent space (`torch.nn.functional.interpolate` on the first pass's latents, before any
  decoding): `latent` (bilinear, A1111's "Latent"), `latent-antialiased`,
  `latent-bicubic`, `latent-bicubic-antialiased`, `latent-nearest`,
  `latent-nearest-exact`;
- image space (the first pass decoded, resized, encoded again by the img2img pass):
  `lanczos` and `nearest` (Pillow). More image upscalers (models) plug in by name on the
  replica (`serve_app.generation.hires.image_upscaler`).

Sizes: the target is `scale` x the first pass, or `width` and/or `height` (one of them:
the other keeps the first pass's aspect), rounded down to the model's size multiple. When
the target's aspect differs from the first pass's, the first pass is scaled to cover it
and centre-cropped, as A1111 does with `hr_resize_x` and `hr_resize_y`.
"""

from __future__ import annotations

import math

# name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
IMAGE_UPSCALERS: tuple[str, ...] = ("lanczos", "nearest")
UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)

DEFAULT_UPSCALER = "latent"
DEFAULT_SCALE = 2.0
# A1111's web UI default. Latent upscaling blurs: below about 0.5 the blur stays.
DEFAULT_DENOISING_STRENGTH = 0.7
MAX_SCALE = 4.0


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_UPSCALERS


def target_size(width: int, height: int, multiple: int, *, scale: float | None = None,
                to_width: int | None = None, to_height: int | None = None) -> tuple[int, int]:
    """The final size for a first pass of `width` x `height`: `scale` times it, or the
    width and/or height asked for (the missing one keeps the aspect); a computed side is
    rounded down to `multiple` (an asked-for side is returned as asked, for the caller to
    check)."""
    if to_width is None and to_height is None:
        factor = DEFAULT_SCALE if scale is None else scale
        return _down(width * factor, multiple), _down(height * factor, multiple)
    if to_height is None:
        assert to_width is not None
        return to_width, _down(to_width * height / width, multiple)
    if to_width is None:
        return _down(to_height * width / height, multiple), to_height
    return to_width, to_height


def cover(width: int, height: int, to_width: int, to_height: int, unit: int = 1
          ) -> tuple[int, int]:
    """The first pass (`width` x `height`) scaled, aspect kept, to cover `to_width` x
    `to_height`, in units of `unit` pixels (8: latent pixels), never smaller than the
    target: what is then centre-cropped to the target."""
    factor = max(to_width / width, to_height / height)
    return (max(to_width // unit, math.ceil(width * factor / unit - 1e-9)),
            max(to_height // unit, math.ceil(height * factor / unit - 1e-9)))


def crop_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred `target` inside `size`."""
    left, top = (size[0] - target[0]) // 2, (size[1] - target[1]) // 2
    return left, top, left + target[0], top + target[1]


def _down(value: float, multiple: int) -> int:
    return max(multiple, int(value + 1e-9) // multiple * multiple)
