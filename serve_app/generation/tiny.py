"""The embedded models: tiny pipelines of each family with seeded random weights.

No machine here reaches a model hub, so the test models are built locally from small configs
(`serve_app.generation.tiny_parts`) and saved exactly like real checkpoints
(`save_pretrained(..., safe_serialization=True)`); they then load through the real code
path, `<Pipeline>.from_pretrained(dir)`.

Sources (`TINY_SOURCES`, registry `source:`): `tiny` (SD 1.x shape), `tiny-inpaint` (its
9-channel inpainting variant), `tiny-sdxl` (two CLIP encoders, pooled embeddings and time
ids), `tiny-flux` (CLIP + T5, a guidance-distilled FLUX transformer, a 16-channel VAE) and
`tiny-sd3` (two CLIPs + T5, an SD 3 transformer).

Contract:
- Every module is seeded (see `tiny_parts`), so the weights (and so every image the model
  makes) are byte-identical on every machine.
- The VAEs have 4 blocks, so `vae_scale_factor` is 8 as in the real models.
- Building is atomic (build in a temporary folder beside the target, then one rename),
  serialized across processes by a file lock, and idempotent (`ensure_tiny_model`).
- The SD 1.x ones (`tiny`, `tiny-inpaint`) include a tiny safety checker that never flags
  unless its thresholds are lowered (`serve_app.generation.safety`); it is loaded only with
  ENABLE_NSFW_FILTER.

`build_tiny_ip_adapter` writes a matching IP-Adapter (weights file + CLIP image encoder
folder) in the layout of the real ones, so the IP-Adapter style path runs offline too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from filelock import FileLock
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from serve_app.errors import ConfigError
from serve_app.generation import tiny_parts as parts
from serve_app.generation.safety import tiny_feature_extractor, tiny_safety_checker
from serve_app.generation.tiny_parts import tokenizer_vocab, write_tokenizer_files

__all__ = [
    "TINY_SOURCES", "build_pipeline", "build_tiny_ip_adapter", "build_tiny_model",
    "build_tiny_pipeline", "ensure_tiny_model", "reseed_denoiser", "tokenizer_vocab",
    "write_tokenizer_files",
]

TINY_SOURCES: tuple[str, ...] = ("tiny", "tiny-inpaint", "tiny-sdxl", "tiny-flux", "tiny-sd3")
_HIDDEN = parts.HIDDEN


def build_pipeline(workdir: Path, inpainting: bool = False) -> StableDiffusionPipeline:
    """The tiny SD pipeline in memory (`workdir` receives the generated tokenizer files)."""
    tokenizer = parts.clip_tokenizer(workdir)
    pipeline_cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return pipeline_cls(
        vae=parts.vae(),
        text_encoder=parts.clip_encoder(tokenizer, "text_encoder"),
        tokenizer=tokenizer,
        unet=parts.sd_unet(9 if inpainting else 4),
        scheduler=parts.sd_scheduler(),
        # As SD 1.x ships: loaded only with ENABLE_NSFW_FILTER (serve_app.generation.safety).
        safety_checker=tiny_safety_checker(parts.SEEDS["safety_checker"]),
        feature_extractor=tiny_feature_extractor(),
        image_encoder=None,
        requires_safety_checker=True,
    )


def build_sdxl_pipeline(workdir: Path) -> StableDiffusionXLPipeline:
    """Both text encoders (the second with its projection, which gives the pooled
    embedding) share the tokenizer; the UNet attends to their concatenated widths."""
    tokenizer = parts.clip_tokenizer(workdir)
    encoder = parts.clip_encoder(tokenizer, "text_encoder")
    encoder_2 = parts.clip_encoder(tokenizer, "text_encoder_2", projection=True)
    width = encoder.config.hidden_size + encoder_2.config.hidden_size
    return StableDiffusionXLPipeline(
        vae=parts.vae(),
        text_encoder=encoder,
        text_encoder_2=encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=parts.sdxl_unet(4, width, encoder_2.config.projection_dim),
        scheduler=parts.sdxl_scheduler(),
    )


def build_flux_pipeline(workdir: Path, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1 dev's shape by default; `guidance_embeds=False` gives schnell's."""
    tokenizer, tokenizer_2 = parts.clip_tokenizer(workdir), parts.t5_tokenizer()
    clip = parts.clip_encoder(tokenizer, "text_encoder")
    t5 = parts.t5_encoder(tokenizer_2, d_model=_HIDDEN)
    return FluxPipeline(
        scheduler=parts.flux_scheduler(),
        vae=parts.vae(latent_channels=16),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=parts.flux_transformer(t5.config.d_model, clip.config.hidden_size,
                                           guidance_embeds),
    )


def build_sd3_pipeline(workdir: Path) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_3 = parts.clip_tokenizer(workdir), parts.t5_tokenizer()
    clip = parts.clip_encoder(tokenizer, "text_encoder", projection=True)
    clip_2 = parts.clip_encoder(tokenizer, "text_encoder_2", projection=True)
    # SD 3 pads the CLIPs' concatenated width up to T5's: T5 must be at least as wide.
    t5 = parts.t5_encoder(tokenizer_3, d_model=2 * _HIDDEN)
    return StableDiffusion3Pipeline(
        transformer=parts.sd3_transformer(t5.config.d_model, 2 * _HIDDEN),
        scheduler=parts.sd3_scheduler(),
        vae=parts.vae(latent_channels=16),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=clip_2,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_pipeline(source: str, workdir: Path) -> DiffusionPipeline:
    """The in-memory pipeline of tiny `source` (one of `TINY_SOURCES`)."""
    if source in ("tiny", "tiny-inpaint"):
        return build_pipeline(workdir, inpainting=source == "tiny-inpaint")
    if source == "tiny-sdxl":
        return build_sdxl_pipeline(workdir)
    if source == "tiny-flux":
        return build_flux_pipeline(workdir)
    if source == "tiny-sd3":
        return build_sd3_pipeline(workdir)
    raise ValueError(f"not a tiny model source: {source!r}; valid: {TINY_SOURCES}")


def reseed_denoiser(pipe: DiffusionPipeline, seed: int) -> None:
    """Make `pipe` seed `seed`'s variant: every denoiser weight moved by seeded noise (10%
    of the tensor's spread), in parameter-name order, on the CPU. The same seed gives the
    same bytes on every machine; another seed, another checkpoint of the same shape."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(denoiser.named_parameters()):
            spread = param.std() if param.numel() > 1 else param.abs() + 0.01
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(noise * 0.1 * spread)


def build_tiny_model(target_dir: Path, source: str = "tiny", seed: int | None = None) -> Path:
    """Build tiny `source` (seed `seed`'s variant, see `reseed_denoiser`) into
    `target_dir` atomically; returns `target_dir`.

    Safe against concurrent builders: a file lock beside the target serializes them, and
    the folder appears in one rename, so a reader sees either nothing or a complete model.
    If the target already holds a model (another process won), it is kept as is.
    """
    target_dir = Path(target_dir)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir.parent / f".{target_dir.name}.lock")):
        if _complete(target_dir):
            return target_dir
        _clear_empty(target_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.build-", dir=target_dir.parent))
        try:
            pipe = build_tiny_pipeline(source, staging / "_tokenizer_source")
            if seed is not None:
                reseed_denoiser(pipe, seed)
            pipe.save_pretrained(staging / "model", safe_serialization=True)
            try:
                os.rename(staging / "model", target_dir)
            except OSError:
                # Lost a race with a builder that holds no lock we can see (another host
                # on a shared disk): its complete folder wins, ours is discarded.
                if not _complete(target_dir):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def ensure_tiny_model(spec_source: str, target_dir: Path, seed: int | None = None) -> Path:
    """Build the tiny model for `spec_source` (one of `TINY_SOURCES`; `seed`: its seeded
    variant) unless already there."""
    if spec_source not in TINY_SOURCES:
        raise ValueError(f"not a tiny model source: {spec_source!r}; valid: {TINY_SOURCES}")
    target_dir = Path(target_dir)
    if _complete(target_dir):
        return target_dir
    return build_tiny_model(target_dir, spec_source, seed)


def build_tiny_ip_adapter(target_dir: Path) -> tuple[Path, Path]:
    """Write a seeded IP-Adapter for the tiny UNet into `target_dir`.

    Returns (`ip-adapter.safetensors`, `image_encoder/`): the values for a spec's
    `ip_adapter` and `image_encoder`. Not atomic: meant for tests and local experiments.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(parts.SEEDS["image_encoder"])
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            projection_dim=_HIDDEN,
        )
    ).eval()
    encoder_dir = target_dir / "image_encoder"
    encoder.save_pretrained(encoder_dir, safe_serialization=True)

    tokens = 4  # a plain IP-Adapter projects the image embedding to 4 extra text tokens
    torch.manual_seed(parts.SEEDS["ip_adapter"])
    tensors = {
        "image_proj.proj.weight": torch.randn(_HIDDEN * tokens, _HIDDEN) * 0.1,
        "image_proj.proj.bias": torch.zeros(_HIDDEN * tokens),
        "image_proj.norm.weight": torch.ones(_HIDDEN),
        "image_proj.norm.bias": torch.zeros(_HIDDEN),
    }
    unet = parts.sd_unet(4)
    # diffusers numbers the cross-attention processors 1, 3, 5, ... in processor order.
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        width = _processor_width(unet, name)
        for proj in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(width, _HIDDEN) * 0.1
        key_id += 2
    weights = target_dir / "ip-adapter.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    return weights, encoder_dir


def _processor_width(unet: UNet2DConditionModel, name: str) -> int:
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return int(channels[-1])
    block = int(name.split(".")[1])
    return int((channels[::-1] if name.startswith("up_blocks") else channels)[block])


def _complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _clear_empty(folder: Path) -> None:
    """Remove an empty leftover folder; refuse to overwrite anything else found there."""
    if not folder.exists():
        return
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        return
    raise ConfigError(
        f"{folder} exists but holds no model_index.json: remove it (or point the cache "
        "directory elsewhere) so the tiny model can be built there"
    )
