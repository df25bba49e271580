"""Full-size SD 1.5, SDXL and FLUX.1 architectures with seeded random weights, for the GPU
check (bench/gpucheck.py): every matmul and convolution has its real size and every weight
its real memory, with nothing downloaded. The tokenizers are the project's offline ones
(serve_app.generation.tiny_parts); a prompt's tokens differ from a real tokenizer's, its
cost does not. Modules are built directly on the device in the dtype they run in (FLUX's
12B transformer in float32 would not fit beside its T5 on an 80 GB GPU).

`dry=True` builds the tiny models' shapes instead: the same code, on a CPU, in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32,
}
CLIP_L: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12,
                          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIGG: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120,
                             "num_hidden_layers": 32, "num_attention_heads": 20,
                             "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL: dict[str, Any] = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                          "num_heads": 64, "feed_forward_proj": "gated-gelu"}


@contextmanager
def building(device: str, dtype: Any, seed: int) -> Iterator[None]:
    """Modules made in this block are created on `device`, in `dtype`, seeded."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip(tokenizer: Any, config: dict[str, Any], projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from serve_app.generation.tiny_parts import BOS

    eos = tokenizer.eos_token_id
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**config, vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
                              eos_token_id=eos, pad_token_id=eos)).eval()


def build(family: str, workdir: Path, device: str, dtype: Any, dry: bool = False) -> Any:
    """`family` (sd, sdxl, flux) with random weights on `device` in `dtype`."""
    from serve_app.generation import tiny, tiny_parts

    if dry:
        source = {"sd": "tiny", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}[family]
        return tiny.build_tiny_pipeline(source, workdir).to(device=device, dtype=dtype)
    tokenizer = tiny_parts.clip_tokenizer(workdir / "tokenizer")
    with building(device, dtype, 0):
        if family == "sd":
            return _sd15(tokenizer)
        if family == "sdxl":
            return _sdxl(tokenizer)
        return _flux(tokenizer)


def _sd15(tokenizer: Any) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from serve_app.generation import tiny_parts

    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE, latent_channels=4).eval(),
        text_encoder=_clip(tokenizer, CLIP_L), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET).eval(), scheduler=tiny_parts.sd_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)


def _sdxl(tokenizer: Any) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from serve_app.generation import tiny_parts

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE, latent_channels=4, force_upcast=False).eval(),
        text_encoder=_clip(tokenizer, CLIP_L), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, CLIP_BIGG, projection=True), tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**SDXL_UNET).eval(),
        scheduler=tiny_parts.sdxl_scheduler())


def _flux(tokenizer: Any) -> Any:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from serve_app.generation import tiny_parts

    t5_tokenizer = tiny_parts.t5_tokenizer()
    t5 = T5EncoderModel(T5Config(**T5_XXL, vocab_size=len(t5_tokenizer),
                                 decoder_start_token_id=t5_tokenizer.pad_token_id,
                                 pad_token_id=t5_tokenizer.pad_token_id,
                                 eos_token_id=t5_tokenizer.eos_token_id)).eval()
    return FluxPipeline(
        scheduler=tiny_parts.flux_scheduler(),
        vae=AutoencoderKL(**VAE, latent_channels=16, use_quant_conv=False,
                          use_post_quant_conv=False, scaling_factor=0.3611,
                          shift_factor=0.1159).eval(),
        text_encoder=_clip(tokenizer, CLIP_L), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER).eval())
