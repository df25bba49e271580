"""The architecture of the trained tiny SD 1.x pipeline, in one place: module configs,
seeded construction, and the scheduler it is trained with.

Contract:
- `new_vae()`, `new_text_encoder(tokenizer)`, `new_unet(in_channels)` and
  `new_controlnet(unet)` build fresh modules right after `torch.manual_seed(<seed>)`, so a
  retrain starts from the same weights on every machine.
- The VAE has 3 blocks: `vae_scale_factor` 4, a 64x64 picture is a 16x16x4 latent (a finer
  grid than SD's 1/8 makes positions and corners easier to draw; the service's sizes must
  still be multiples of 8, which 4 divides).
- `train_scheduler()` is SD 1.5's noise schedule (scaled_linear betas) with
  v-prediction and zero terminal SNR: with so few, flat colours, SD's leftover signal at the
  last timestep would bias every image towards the mean colour (a black or white
  background would come out grey). Inference samplers derive from this config
  (`Cls.from_config`), so they inherit the prediction type and the rescaled betas.
- Module sizes are chosen for these CPUs: see `serve_app.training.__init__`'s figures.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SEEDS = {"vae": 11, "text_encoder": 12, "unet": 13, "controlnet": 14, "lora": 15,
         "inpaint": 16}
IMAGE_SIZE = 64
VAE_FACTOR = 4
LATENT_CHANNELS = 4
TEXT_WIDTH = 64
UNET_CHANNELS = (32, 64, 96, 128)
# The conditioning embedding brings the control image to the latent grid: as many stride-2
# stages as the VAE has downsamplings (2), so 3 stages.
CONTROL_EMBEDDING_CHANNELS = (16, 32, 64)


def new_vae() -> AutoencoderKL:
    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def new_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEEDS["text_encoder"])
    return CLIPTextModel(config)


def new_unet(in_channels: int = LATENT_CHANNELS) -> UNet2DConditionModel:
    """Four levels on the 16x16 latent grid (16, 8, 4, 2), like SD's four on 64x64.
    Cross-attention at 8x8 and 4x4 and in the middle; the 16x16 level is convolutions only
    (attention there cost the most per step and bought little).
    Why a 2x2 level: a UNet has no positional encoding, it learns where it is from the
    zero padding at the borders. On a 2x2 grid every cell touches two borders, a different
    pair each, so "left" and "right" are told apart after one convolution; with three
    levels the model drew a shape asked "on the left" on both sides, and positions stayed
    at chance (20 %) after 1,500 steps."""
    torch.manual_seed(SEEDS["unet"])
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_FACTOR,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def new_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet initialised from `unet`'s encoder (the standard recipe: it starts as a
    copy, its zero convolutions make it a no-op until trained)."""
    torch.manual_seed(SEEDS["controlnet"])
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONTROL_EMBEDDING_CHANNELS)


def train_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
