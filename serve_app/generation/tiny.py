"""The embedded default models: tiny Stable-Diffusion-shaped pipelines with seeded random weights.

No machine here reaches a model hub, so the default model is built locally from small configs
and saved exactly like a real checkpoint (`save_pretrained(..., safe_serialization=True)`);
it then loads through the real code path, `StableDiffusionPipeline.from_pretrained(dir)`.

Contract:
- Every module is constructed right after `torch.manual_seed(<fixed>)` on the CPU, so the
  weights (and so every image the model makes) are byte-identical on every machine.
- The VAE has 4 blocks, so `vae_scale_factor` is 8 as in real SD: sizes are multiples of 8.
- `inpainting=True` gives a 9-channel UNet for `StableDiffusionInpaintPipeline`.
- Building is atomic (build in a temporary folder beside the target, then one rename),
  serialized across processes by a file lock, and idempotent (`ensure_tiny_model`).
- No safety checker (`safety_checker=None`, `requires_safety_checker=False`).

`build_tiny_ip_adapter` writes a matching IP-Adapter (weights file + CLIP image encoder
folder) in the layout of the real ones, so the IP-Adapter style path runs offline too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from filelock import FileLock
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from serve_app.errors import ConfigError

TINY_SOURCES: tuple[str, ...] = ("tiny", "tiny-inpaint")

# One seed per module, so changing one module's config leaves the others' weights alone.
_SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2, "image_encoder": 3, "ip_adapter": 4}
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_HIDDEN = 32  # text encoder width == UNet cross-attention width


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tokenizer_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every byte, as is and word-final."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (header only: no merges) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False, sort_keys=False))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def _tokenizer(workdir: Path) -> CLIPTokenizer:
    vocab_path, _ = write_tokenizer_files(workdir)
    vocab = json.loads(vocab_path.read_text())
    # Without model_max_length, padding to max length (what SD pipelines do) breaks.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(_SEEDS["text_encoder"])
    return CLIPTextModel(config).eval()


def _unet(in_channels: int) -> UNet2DConditionModel:
    torch.manual_seed(_SEEDS["unet"])
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_HIDDEN,
        attention_head_dim=8,
    ).eval()


def _vae() -> AutoencoderKL:
    torch.manual_seed(_SEEDS["vae"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks: three downsamplings, vae_scale_factor 8 as in real SD.
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    ).eval()


def _scheduler() -> PNDMScheduler:
    # SD 1.5's shipped scheduler config: samplers are derived from it with from_config.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(workdir: Path, inpainting: bool = False) -> StableDiffusionPipeline:
    """The tiny pipeline in memory (`workdir` receives the generated tokenizer files)."""
    tokenizer = _tokenizer(workdir)
    pipeline_cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return pipeline_cls(
        vae=_vae(),
        text_encoder=_text_encoder(
            len(tokenizer), tokenizer.convert_tokens_to_ids(_BOS), tokenizer.eos_token_id
        ),
        tokenizer=tokenizer,
        unet=_unet(9 if inpainting else 4),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_model(target_dir: Path, inpainting: bool = False) -> Path:
    """Build the tiny model into `target_dir` atomically; returns `target_dir`.

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
            pipe = build_pipeline(staging / "_tokenizer_source", inpainting=inpainting)
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


def ensure_tiny_model(spec_source: str, target_dir: Path) -> Path:
    """Build the tiny model for `spec_source` ("tiny" / "tiny-inpaint") unless already there."""
    if spec_source not in TINY_SOURCES:
        raise ValueError(f"not a tiny model source: {spec_source!r}; valid: {TINY_SOURCES}")
    target_dir = Path(target_dir)
    if _complete(target_dir):
        return target_dir
    return build_tiny_model(target_dir, inpainting=spec_source == "tiny-inpaint")


def build_tiny_ip_adapter(target_dir: Path) -> tuple[Path, Path]:
    """Write a seeded IP-Adapter for the tiny UNet into `target_dir`.

    Returns (`ip-adapter.safetensors`, `image_encoder/`): the values for a spec's
    `ip_adapter` and `image_encoder`. Not atomic: meant for tests and local experiments.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(_SEEDS["image_encoder"])
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
    torch.manual_seed(_SEEDS["ip_adapter"])
    tensors = {
        "image_proj.proj.weight": torch.randn(_HIDDEN * tokens, _HIDDEN) * 0.1,
        "image_proj.proj.bias": torch.zeros(_HIDDEN * tokens),
        "image_proj.norm.weight": torch.ones(_HIDDEN),
        "image_proj.norm.bias": torch.zeros(_HIDDEN),
    }
    unet = _unet(4)
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
