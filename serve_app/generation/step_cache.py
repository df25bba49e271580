"""Step caching: fewer denoiser computations per image, opted into per model
(`runtime.step_cache`), at a measured cost in quality (bench/stepcache.py).

Consecutive denoising steps compute nearly the same deep features. Two ways to reuse them:

- `deepcache` (UNet families: SD 1.x, SDXL), after DeepCache (Ma et al., 2023): every
  `every`-th step runs the whole UNet and keeps the input of its last (shallowest) up block;
  the steps between run only the shallow path (`conv_in`, the first down block, that last up
  block fed the kept features, the output layers) and skip everything deeper, where most
  of a UNet's FLOPs are. Which steps are full is fixed by the step index, not by the data,
  so every image of a batch gets the same schedule as alone: the batch-invariance of
  serve_app.generation.batching holds, and a seed gives the same image on every call.
- `taylorseer` and `first_block` (transformer families: FLUX, SD 3): diffusers' cache hooks
  (`TaylorSeerCacheConfig`: a full step every `every` steps, the ones between extrapolated
  from the last ones by a Taylor series; `FirstBlockCacheConfig`: a step reuses the last
  residual of all but the first block when the first block's output changed less than
  `threshold`; FLUX only). `first_block` decides from the whole batch's change (and reads
  that number back to the host once a step): a batched image may differ from the same seed
  alone (documented in docs/models.md); `taylorseer` keeps to a fixed schedule.

A cache holds state across the steps of one pipeline call: the runner wraps every call in
`StepCache.call()`, which starts it empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from serve_app.errors import ConfigError
from serve_app.model_runtime import StepCacheSpec

UNET_KINDS = frozenset({"deepcache"})
TRANSFORMER_KINDS = frozenset({"taylorseer", "first_block"})


class StepCache:
    """No caching: every step computes the whole denoiser."""

    kind = "none"

    @contextmanager
    def call(self) -> Iterator[None]:
        yield

    @property
    def full_steps(self) -> int:
        return 0


def attach(denoiser: torch.nn.Module, spec: StepCacheSpec | None, model_id: str) -> StepCache:
    """The step cache `spec` asks for, installed on `denoiser` (or none)."""
    if spec is None:
        return StepCache()
    is_unet = hasattr(denoiser, "up_blocks")
    if spec.kind in UNET_KINDS:
        if not is_unet:
            raise ConfigError(f"model {model_id}: runtime.step_cache {spec.kind} is for UNet "
                              f"models (SD 1.x, SDXL); use taylorseer or first_block")
        return DeepCache(denoiser, spec.every)
    if is_unet:
        raise ConfigError(f"model {model_id}: runtime.step_cache {spec.kind} is for "
                          f"transformer models (FLUX, SD 3); use deepcache")
    blocks = getattr(denoiser, "transformer_blocks", None)
    if spec.kind == "first_block" and blocks and getattr(blocks[-1], "context_pre_only", False):
        # SD 3's last block returns no text stream, which diffusers' hook subtracts from.
        raise ConfigError(f"model {model_id}: runtime.step_cache first_block does not apply "
                          f"to SD 3 transformers in diffusers 0.42; use taylorseer")
    return HookCache(denoiser, spec)


class DeepCache(StepCache):
    """See the module docstring. Wraps `unet.forward` (outside any batch-invariance
    wrapper already installed there)."""

    kind = "deepcache"

    def __init__(self, unet: torch.nn.Module, every: int) -> None:
        self.unet = unet
        self.every = every
        self._inner: Callable[..., Any] = unet.forward
        self._step = 0
        self._kept: torch.Tensor | None = None
        self._keeping = False
        self.full = 0  # full forwards in the current call (for tests and benches)
        unet.up_blocks[-1].register_forward_pre_hook(self._keep, with_kwargs=True)
        unet.forward = self._forward

    @contextmanager
    def call(self) -> Iterator[None]:
        self._step, self._kept, self.full = 0, None, 0
        try:
            yield
        finally:
            self._kept = None  # the features of a finished call are garbage

    @property
    def full_steps(self) -> int:
        return self.full

    def _keep(self, module: torch.nn.Module, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> None:
        if self._keeping:
            self._kept = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: Any = None,
                 **kwargs: Any) -> Any:
        step, self._step = self._step, self._step + 1
        kept = self._kept
        if step % self.every == 0 or kept is None or kept.shape[0] != sample.shape[0]:
            self._keeping = True
            try:
                out = self._inner(sample, timestep, encoder_hidden_states, **kwargs)
            finally:
                self._keeping = False
            self.full += 1
            return out
        return self._shallow(sample, timestep, encoder_hidden_states, kept, **kwargs)

    def _shallow(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: Any,
                 kept: torch.Tensor, class_labels: Any = None, timestep_cond: Any = None,
                 attention_mask: torch.Tensor | None = None,
                 cross_attention_kwargs: dict[str, Any] | None = None,
                 added_cond_kwargs: dict[str, Any] | None = None,
                 down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                 mid_block_additional_residual: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None,
                 return_dict: bool = True, **unsupported: Any) -> Any:
        """UNet2DConditionModel.forward (diffusers 0.42) down to its first down block, then
        its last up block on the kept features: the same layers, the same order."""
        unet = self.unet
        if unsupported.get("down_intrablock_additional_residuals") is not None:
            raise ValueError("deepcache does not support T2I-Adapter residuals")
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = (
                (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep),
                                  timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = (torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat
                   else emb + class_emb)
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        sample = unet.conv_in(sample)
        attention = {"encoder_hidden_states": encoder_hidden_states,
                     "attention_mask": attention_mask,
                     "cross_attention_kwargs": cross_attention_kwargs,
                     "encoder_attention_mask": encoder_attention_mask}
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=sample, temb=emb, **attention)
        else:
            _, res = first(hidden_states=sample, temb=emb)
        last = unet.up_blocks[-1]
        skips = ((sample, *res))[:len(last.resnets)]
        if down_block_additional_residuals is not None:  # a ControlNet's, as in forward
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals,
                                                strict=False))
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=kept, temb=emb, res_hidden_states_tuple=skips,
                       upsample_size=None, **attention)
        else:
            out = last(hidden_states=kept, temb=emb, res_hidden_states_tuple=skips,
                       upsample_size=None)
        if unet.conv_norm_out:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class HookCache(StepCache):
    """diffusers' cache hooks on a transformer (applied as `CacheMixin.enable_cache` would,
    also on transformers without that mixin, such as SD 3's in diffusers 0.42)."""

    def __init__(self, transformer: torch.nn.Module, spec: StepCacheSpec) -> None:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_taylorseer_cache,
        )

        self.kind = spec.kind
        self.transformer = transformer
        if spec.kind == "taylorseer":
            # Full steps: the first two (the series needs them), then every `every`-th.
            apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(
                cache_interval=spec.every, disable_cache_before_step=2,
                taylor_factors_dtype=torch.float32))
        else:
            apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=spec.threshold))

    @contextmanager
    def call(self) -> Iterator[None]:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.reset_stateful_hooks(recurse=True)
        # FLUX's pipeline names each forward's cache context itself (inside this one);
        # SD 3's names none, and the hooks' state needs one.
        _set_cache_context(self.transformer, CacheContext("cond"))
        try:
            yield
        finally:
            _set_cache_context(self.transformer, None)
            registry.reset_stateful_hooks(recurse=True)
