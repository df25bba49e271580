"""Seeded components of the embedded tiny models: tokenizers built offline, text encoders,
denoisers (UNets, transformers), VAEs and scheduler configs.

Every module is constructed right after `torch.manual_seed(<its own seed>)` on the CPU, so
its weights are byte-identical on every machine, and changing one module's config leaves
the others' weights alone. Shapes follow the real families at a tiny width: two CLIP
encoders and a `text_time` UNet for SDXL; CLIP + T5, a 16-channel VAE and a transformer over
2x2-packed latents for FLUX; two CLIPs + T5 and a patch-2 transformer for SD 3.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# One seed per module. The first five are tiny-sd's (and its IP-Adapter's): unchanged, so
# tiny-sd makes the images it always made.
SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2, "image_encoder": 3, "ip_adapter": 4,
         "text_encoder_2": 5, "t5": 6, "transformer": 7, "vae_16": 8, "sdxl_unet": 9,
         "safety_checker": 10}
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
HIDDEN = 32  # CLIP width == tiny-sd's UNet cross-attention width
T5_MAX_LENGTH = 512


# -- tokenizers ------------------------------------------------------------------------


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
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (header only: no merges) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False, sort_keys=False))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def clip_tokenizer(workdir: Path) -> CLIPTokenizer:
    vocab_path, _ = write_tokenizer_files(workdir)
    vocab = json.loads(vocab_path.read_text())
    # Without model_max_length, padding to max length (what SD pipelines do) breaks.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A SentencePiece-style unigram T5 tokenizer over printable ASCII, built offline:
    each character as a piece, and word-initial (`▁x`) pieces, which score higher so a
    word's first character keeps its word boundary. Other characters become `<unk>`."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# -- text encoders ---------------------------------------------------------------------


def clip_encoder(tokenizer: CLIPTokenizer, seed: str, projection: bool = False,
                 hidden: int = HIDDEN) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEEDS[seed])
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEEDS["t5"])
    return T5EncoderModel(config).eval()


# -- denoisers -------------------------------------------------------------------------


def sd_unet(in_channels: int) -> UNet2DConditionModel:
    torch.manual_seed(SEEDS["unet"])
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
    ).eval()


SDXL_TIME_EMBED_DIM = 8


def sdxl_unet(in_channels: int, text_width: int, pooled_width: int) -> UNet2DConditionModel:
    """SDXL's shape: linear projections, more transformer layers deeper down, and the
    `text_time` added embedding (pooled text + 6 size/crop time ids)."""
    torch.manual_seed(SEEDS["sdxl_unet"])
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_width,
    ).eval()


def flux_transformer(text_width: int, pooled_width: int,
                     guidance_embeds: bool) -> FluxTransformer2DModel:
    """FLUX's shape: one double-stream and one single-stream block over 2x2-packed
    16-channel latents (64 input channels). `guidance_embeds` is what makes FLUX.1 dev
    guidance-distilled; schnell has none."""
    torch.manual_seed(SEEDS["transformer"])
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        pooled_projection_dim=pooled_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    ).eval()


def sd3_transformer(text_width: int, pooled_width: int) -> SD3Transformer2DModel:
    torch.manual_seed(SEEDS["transformer"])
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=text_width,
        caption_projection_dim=32,
        pooled_projection_dim=pooled_width,
        out_channels=16,
        pos_embed_max_size=96,
    ).eval()


# -- VAEs and schedulers ---------------------------------------------------------------


def vae(latent_channels: int = 4) -> AutoencoderKL:
    """Four blocks (three downsamplings): `vae_scale_factor` 8 as in the real models.
    16 latent channels is the FLUX / SD 3 layout: no quant convs, a shift factor."""
    flow = latent_channels == 16
    torch.manual_seed(SEEDS["vae_16" if flow else "vae"])
    extra: dict[str, object] = {}
    if flow:
        # FLUX.1's VAE constants (SD 3.5's are 1.5305 / 0.0609).
        extra = {"use_quant_conv": False, "use_post_quant_conv": False,
                 "scaling_factor": 0.3611, "shift_factor": 0.1159}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=256,
        **extra,
    ).eval()


def sd_scheduler() -> PNDMScheduler:
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


def sdxl_scheduler() -> EulerDiscreteScheduler:
    # SDXL 1.0's shipped scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1 dev's shipped config: the shift grows with the image's token count.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # SD 3.5's shipped config: a fixed shift of 3.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
