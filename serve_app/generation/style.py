"""Style transfer: IP-Adapter when the model has one, else AdaIN on the VAE latents.

Both paths end in one img2img call from a starting image, with denoising strength

    strength = clamp(style_strength * (1 - content_strength), MIN_STRENGTH, 1)

so a small `style_strength` barely touches the content image, `content_strength` 1 keeps
its structure, and the defaults (0.7, 0.3) denoise about half way (0.49): enough for the
model to clean up the transfer while the content's layout survives. `style_strength` 0
returns the content image itself without a pipeline call: any call would at least pass it
through the VAE, which blurs it a little with real weights and scrambles it with the tiny
model's random ones.

- IP-Adapter (`spec.ip_adapter` + `spec.image_encoder`): the content image is the img2img
  start, the style image the `ip_adapter_image`, with adapter scale `style_strength`. The
  adapter is attached to the shared UNet only for the duration of a style call (with the
  adapter attached, every call would need an image prompt), and its processors are kept so
  re-attaching costs no disk read.
- AdaIN: content and style images are VAE-encoded (distribution means, so no randomness);
  the per-channel mean/std of the style latents are moved onto the content latents,
  blended by `style_strength` (0 leaves the content latents untouched); the result is
  decoded and is the img2img start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from serve_app.errors import ConfigError

MIN_STRENGTH = 0.05
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def style_denoise_strength(style_strength: float, content_strength: float) -> float:
    """The img2img strength of a style job (formula in the module docstring)."""
    raw = style_strength * (1.0 - content_strength)
    return min(1.0, max(MIN_STRENGTH, raw))


def adain(
    content: torch.Tensor, style: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """Adaptive instance normalization of (B, C, H, W) latents, blended by `alpha` in [0, 1]."""
    c_mean = content.mean(dim=(2, 3), keepdim=True)
    c_std = content.std(dim=(2, 3), keepdim=True) + eps
    s_mean = style.mean(dim=(2, 3), keepdim=True)
    s_std = style.std(dim=(2, 3), keepdim=True) + eps
    transferred = (content - c_mean) / c_std * s_std + s_mean
    # lerp with weight 0 returns `content` exactly.
    return torch.lerp(content, transferred, float(alpha))


@torch.no_grad()
def adain_start_image(
    pipe: DiffusionPipeline,
    content: Image.Image,
    style: Image.Image,
    style_strength: float,
) -> Image.Image:
    """The AdaIN-stylized content image (content size) that img2img then refines."""
    width, height = content.size
    with _vae_in_working_precision(pipe) as vae:
        content_latents = _encode(pipe, vae, content, width, height)
        # Only the style's statistics matter: keep its aspect, cap its area at the output's.
        style_w, style_h = _capped_size(style.size, width * height, int(pipe.vae_scale_factor))
        style_latents = _encode(pipe, vae, style, style_w, style_h)
        latents = adain(content_latents, style_latents, style_strength)
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]


def _encode(
    pipe: DiffusionPipeline, vae: Any, image: Image.Image, width: int, height: int
) -> torch.Tensor:
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def _capped_size(size: tuple[int, int], max_pixels: int, multiple: int) -> tuple[int, int]:
    """`size` scaled down (never up) to at most `max_pixels`, in multiples of `multiple`."""
    width, height = size
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    return (
        max(multiple, int(width * scale) // multiple * multiple),
        max(multiple, int(height * scale) // multiple * multiple),
    )


@contextlib.contextmanager
def _vae_in_working_precision(pipe: DiffusionPipeline) -> Iterator[Any]:
    """The VAE, upcast to float32 for the call when its config says half overflows (SDXL)."""
    vae = pipe.vae
    original = vae.dtype
    upcast = original == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(original)


class IPAdapter:
    """A locally stored IP-Adapter, loaded on first use and attached per call.

    `weights` is the adapter file (or a folder holding exactly one); `image_encoder` a
    `CLIPVisionModelWithProjection` folder. Not thread-safe: the runner's lock covers it.
    """

    def __init__(self, weights: Path, image_encoder: Path) -> None:
        self.weights = _single_weights_file(weights)
        if not (image_encoder / "config.json").is_file():
            raise ConfigError(f"IP-Adapter image encoder folder {image_encoder} has no config.json")
        self.image_encoder = image_encoder
        self._encoder: CLIPVisionModelWithProjection | None = None
        self._ip_processors: dict[str, Any] | None = None
        self._ip_projection: Any = None

    @contextlib.contextmanager
    def attached(self, pipe: DiffusionPipeline, scale: float) -> Iterator[None]:
        """Within the block, `pipe` takes `ip_adapter_image` at adapter scale `scale`."""
        unet = pipe.unet
        plain = dict(unet.attn_processors)
        hid_proj, hid_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        self._attach(pipe)
        try:
            pipe.set_ip_adapter_scale(scale)
            yield
        finally:
            # set_attn_processor consumes the dict it is given: hand it a copy.
            unet.set_attn_processor(dict(plain))
            unet.encoder_hid_proj = hid_proj
            unet.config.encoder_hid_dim_type = hid_type

    def _attach(self, pipe: DiffusionPipeline) -> None:
        if self._encoder is None:
            self._encoder = CLIPVisionModelWithProjection.from_pretrained(
                self.image_encoder, dtype=pipe.dtype, local_files_only=True
            ).to(pipe.device)
        if getattr(pipe, "image_encoder", None) is None:
            pipe.register_modules(image_encoder=self._encoder)
        if getattr(pipe, "feature_extractor", None) is None:
            size = self._encoder.config.image_size
            pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        if self._ip_processors is None:
            pipe.load_ip_adapter(
                str(self.weights.parent),
                subfolder="",
                weight_name=self.weights.name,
                image_encoder_folder=None,
                local_files_only=True,
            )
            self._ip_processors = dict(pipe.unet.attn_processors)
            self._ip_projection = pipe.unet.encoder_hid_proj
            return
        pipe.unet.set_attn_processor(dict(self._ip_processors))
        pipe.unet.encoder_hid_proj = self._ip_projection
        pipe.unet.config.encoder_hid_dim_type = "ip_image_proj"


def _single_weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(p for p in path.glob("*") if p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        raise ConfigError(
            f"IP-Adapter path {path} must be a weights file or a folder holding exactly one "
            f"{'/'.join(_WEIGHT_SUFFIXES)} file (found {len(candidates)})"
        )
    return candidates[0]
