"""Export an SD 1.x diffusers folder as one original-layout (LDM) `.safetensors` checkpoint.

Users bring single-file checkpoints in the layout of the original Stable Diffusion code
(`model.diffusion_model.*` for the UNet, `first_stage_model.*` for the VAE,
`cond_stage_model.transformer.text_model.*` for CLIP). This writes the tiny model in exactly
that layout, so the replica's `from_single_file` path is exercised offline on a real file.

Beside `name.safetensors` it writes `name/`: the pipeline's configs, scheduler and tokenizer
without weights, which is what `from_single_file(config=...)` reads offline (see
`serve_app.generation.pipelines._from_single_file`).

Scope: SD 1.x shapes (a `UNet2DConditionModel` with the standard down/up blocks and a
cross-attention mid block, an `AutoencoderKL`, a `CLIPTextModel`). Weights are copied
bit for bit, except the VAE attention projections, which the original code stores as 1x1
convolutions (a reshape, exact).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers resnet part -> original name, in the UNet and in the VAE.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
_FIXED_UNET = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def export_ldm_checkpoint(model_dir: Path, target: Path) -> Path:
    """Write `model_dir` (a diffusers SD 1.x folder) as `target` (`.safetensors`) plus its
    config folder `target` without the suffix. Returns `target`."""
    model_dir, target = Path(model_dir), Path(target)
    tensors: dict[str, torch.Tensor] = {}
    unet_config = _config(model_dir / "unet")
    for key, value in _weights(model_dir / "unet").items():
        tensors[UNET_PREFIX + unet_key(key, unet_config)] = value
    vae_config = _config(model_dir / "vae")
    for key, value in _weights(model_dir / "vae").items():
        name = vae_key(key, len(vae_config["up_block_types"]))
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]  # a linear layer stored as a 1x1 convolution
        tensors[VAE_PREFIX + name] = value
    for key, value in _weights(model_dir / "text_encoder").items():
        # transformers 5 flattened CLIPTextModel; the original keys keep `text_model.`.
        name = key if key.startswith("text_model.") else "text_model." + key
        tensors[CLIP_PREFIX + name] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    _write_configs(model_dir, target.with_suffix(""))
    return target


def unet_key(key: str, config: dict[str, object]) -> str:
    """A diffusers UNet weight name in the original layout. The original numbers its
    `input_blocks` and `output_blocks` flat: per down block `layers_per_block` resnet (+
    attention) slots and one downsampler slot; per up block one more slot, the last of which
    also holds the upsampler."""
    per_block = int(config["layers_per_block"]) + 1  # type: ignore[call-overload]
    for new, old in _FIXED_UNET.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    parts = key.split(".")
    if parts[0] == "mid_block":
        index, rest = int(parts[2]), ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * index}.{_resnet(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    block, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
    layer = int(parts[3])
    if parts[0] == "down_blocks":
        slot = 1 + block * per_block
        if kind == "downsamplers":  # downsamplers.0.conv.weight -> <slot>.0.op.weight
            return f"input_blocks.{slot + per_block - 1}.0.op.{'.'.join(parts[5:])}"
        sub = "0" if kind == "resnets" else "1"
        tail = _resnet(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"input_blocks.{slot + layer}.{sub}.{tail}"
    if parts[0] == "up_blocks":
        slot = block * per_block
        if kind == "upsamplers":
            # After the attention in a cross-attention block, else right after the resnet.
            has_attention = "CrossAttn" in str(config["up_block_types"][block])  # type: ignore[index]
            return f"output_blocks.{slot + per_block - 1}.{2 if has_attention else 1}.conv." \
                   f"{'.'.join(parts[5:])}"
        sub = "0" if kind == "resnets" else "1"
        tail = _resnet(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"output_blocks.{slot + layer}.{sub}.{tail}"
    raise ValueError(f"UNet weight {key!r} has no original-layout name (not an SD 1.x UNet?)")


def vae_key(key: str, num_blocks: int) -> str:
    """A diffusers VAE weight name in the original layout (the decoder's up blocks are
    numbered from the bottom there)."""
    coder, rest = key.split(".", 1)
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest.split('.', 1)[1]}"
    parts = rest.split(".")
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return f"{coder}.mid.attn_1.{_rename(parts[3:], _VAE_ATTENTION)}"
        return f"{coder}.mid.block_{int(parts[2]) + 1}.{_resnet('.'.join(parts[3:]), _VAE_RESNET)}"
    if parts[0] in ("down_blocks", "up_blocks"):
        block = int(parts[1])
        level = block if coder == "encoder" else num_blocks - 1 - block
        name = "down" if coder == "encoder" else "up"
        if parts[2] == "resnets":
            return (f"{coder}.{name}.{level}.block.{parts[3]}."
                    f"{_resnet('.'.join(parts[4:]), _VAE_RESNET)}")
        sampler = "downsample" if coder == "encoder" else "upsample"
        return f"{coder}.{name}.{level}.{sampler}.{'.'.join(parts[4:])}"
    return key  # conv_in, conv_out


def _resnet(rest: str, names: dict[str, str]) -> str:
    head, _, param = rest.partition(".")
    return f"{names.get(head, head)}.{param}"


def _rename(parts: list[str], names: dict[str, str]) -> str:
    rest = ".".join(parts)
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{folder} must hold exactly one .safetensors file (found {len(files)})")
    return load_file(str(files[0]))


def _config(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "config.json").read_text())
    return data


def _write_configs(model_dir: Path, config_dir: Path) -> None:
    """Everything of the folder but the weights: what `from_single_file` reads offline."""
    if config_dir.exists():
        shutil.rmtree(config_dir)
    for path in model_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".bin"):
            out = config_dir / path.relative_to(model_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
