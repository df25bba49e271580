"""Batch invariance: an image made in a batch is byte-identical to the same seed made alone.

Per-item generators make the *random* inputs of a batched call equal to those of single
calls, but that is not enough: kernels choose their blocking by tensor shape, so a UNet run
on a batch of 16 differs from eight runs on pairs by ~1e-6, which flips a few 8-bit pixels
after decoding (measured: 24 of 24 pairs differed, at one and at two torch threads).

Which layers vary was measured layer by layer on the tiny SD UNet (oneDNN, 1 and 2
threads): 3x3 convolutions, group and layer norms, attention and the activations give each
image the same bits whatever the batch; `nn.Linear` and 1x1 convolutions do not, because
both are one GEMM whose row count is batch x pixels (or tokens), and the GEMM picks its
blocking from that count. `invariant_layers` rewrites those two as batched matrix products
(`torch.bmm`) with one matrix per image: every image's product then has the same shape,
whatever the batch, and gets the same kernel. With that the whole batch runs in one UNet
call, image for image equal to unbatched calls (tests/unit/test_batching.py checks it at 1 and
2 threads), and no slower: a batch of 16 took 56 ms against 70 ms for the plain layers at
2 threads, a pair 17 ms against 23 ms.

The same holds for the transformer denoisers (FLUX, SD 3): their layers are linear layers,
norms, per-sample attention and element-wise operations (tests/unit/test_families.py checks
batched FLUX and SDXL images against lone ones).

That was measured on CPUs only. On accelerators (CUDA: cuBLAS and cuDNN choose kernels by
shape, batch count included, batched GEMMs too) no layer rewrite makes that promise, and the
only guarantee left is to split the denoiser's forward into per-image sub-batches with
exactly the shapes an unbatched call uses: a batch of k images then costs k forwards, the
latency of a batch with the throughput of one image at a time. So `runtime.batch_invariant`
defaults to `auto`: on a CPU (where it costs nothing) on, on an accelerator off, and a
batch runs as one forward per step. What that trades, stated in docs/models.md: a batched
image may differ from the same seed made alone in the low bits of some pixels (the
denoiser's output differs by rounding, ~1e-3 relative in half precision), never in what it
shows; the same request made alone twice is still identical. `batch_invariant: true` on a
GPU model buys byte-identical batches back at the per-image cost. With classifier-free
guidance the pipeline lays the batch out as [uncond x n, cond x n] and an unbatched call
runs the pair [uncond_i, cond_i], so the pair is the sub-batch: rows i, i+n (a strided
view, `x[i::n]`: no index tensor is built, so the split issues no host-to-device copy). The
VAE decodes one image at a time (slicing) wherever invariance is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def invariant_layers(model: torch.nn.Module) -> int:
    """Rewrite `model`'s linear layers and plain 1x1 convolutions in place as per-image
    batched matrix products (see the module docstring). Returns how many were rewritten."""
    count = 0
    for layer in model.modules():
        # Exact types: a subclass (LoRA-aware, quantized) has a forward of its own to keep.
        if type(layer) is torch.nn.Linear:
            layer.forward = _linear_forward(layer)
            count += 1
        elif type(layer) is torch.nn.Conv2d and _is_pointwise(layer):
            layer.forward = _pointwise_conv_forward(layer)
            count += 1
    return count


def _is_pointwise(conv: torch.nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid"))


# The weight is read at each call (not captured), so loading or fusing LoRA weights later
# still takes effect. An instance `forward` shadows the class's; the module keeps its type.


def _linear_forward(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.numel() == 0:
            return torch.nn.functional.linear(x, layer.weight, layer.bias)
        n = x.shape[0]
        rows = x.reshape(n, -1, x.shape[-1])  # (images, rows per image, features)
        weight = layer.weight.t().expand(n, -1, -1)
        y = (torch.bmm(rows, weight) if layer.bias is None
             else torch.baddbmm(layer.bias, rows, weight))  # one op: bias + product
        return y.reshape(*x.shape[:-1], layer.out_features)

    return forward


def _pointwise_conv_forward(conv: torch.nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.numel() == 0:  # unbatched (C, H, W) or empty: as before
            return conv._conv_forward(x, conv.weight, conv.bias)
        n, channels, h, w = x.shape
        weight = conv.weight.view(conv.out_channels, channels).expand(n, -1, -1)
        pixels = x.reshape(n, channels, h * w)
        y = (torch.bmm(weight, pixels) if conv.bias is None
             else torch.baddbmm(conv.bias.view(-1, 1), weight, pixels))
        return y.view(n, conv.out_channels, h, w)

    return forward


# Inputs without a batch dimension, whatever their length (FLUX's token position ids).
_SHARED_INPUTS = frozenset({"img_ids", "txt_ids"})


class BatchInvariantDenoiser:
    """Makes a denoiser (UNet or transformer) batch-invariant in place: on a CPU by
    `invariant_layers`, elsewhere by splitting its `forward` into per-image sub-batches.

    `blocks` is how many copies of each image the pipeline stacks: 2 under classifier-free
    guidance, else 1. The runner sets it before each call (under its lock). `on_cpu` is
    where the denoiser runs (not where its weights are now: offloaded ones sit on the CPU).
    """

    def __init__(self, denoiser: torch.nn.Module, enabled: bool = True,
                 on_cpu: bool | None = None) -> None:
        self.blocks = 1
        self.model = denoiser
        if on_cpu is None:
            on_cpu = next(denoiser.parameters()).device.type == "cpu"
        # Off (`runtime.batch_invariant` false, or `auto` on an accelerator) the denoiser
        # is left as it is: one forward per step for the whole batch, and a batched image
        # may differ from the same seed made alone in the last bits.
        self.split = enabled and not on_cpu
        self.rewrites = enabled and on_cpu
        self.refresh()
        self._forward: Callable[..., Any] = denoiser.forward
        # An instance attribute shadows the class's forward; the module and its config,
        # attention processors and hooks stay exactly what diffusers expects.
        denoiser.forward = self._split_forward

    def refresh(self) -> None:
        """Rewrite the layers again: after layers were added (a LoRA load wraps linear
        layers in PEFT's, whose own `lora_A`/`lora_B` are new `nn.Linear`s)."""
        if self.rewrites:
            invariant_layers(self.model)

    def _split_forward(self, *args: Any, **kwargs: Any) -> Any:
        # UNets take the latents first and positionally; transformers as `hidden_states`.
        name = None if args else ("hidden_states" if "hidden_states" in kwargs else "sample")
        sample = args[0] if args else kwargs[name]
        batch = sample.shape[0]
        n = batch // self.blocks
        if not self.split or n <= 1 or n * self.blocks != batch:
            return self._forward(*args, **kwargs)
        outputs = []
        for i in range(n):
            rows = slice(i, batch, n)  # image i in each block: rows i, i + n, ...
            outputs.append(self._forward(*_take(args, rows, batch),
                                         **_take(kwargs, rows, batch)))
        return _reassemble(outputs, n, self.blocks)


def _take(value: Any, rows: slice, batch: int) -> Any:
    """`value` with every batch-sized tensor inside it reduced to `rows` (a view)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: v if k in _SHARED_INPUTS else _take(v, rows, batch)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_take(v, rows, batch) for v in value)
    return value


def _reassemble(outputs: list[Any], n: int, blocks: int) -> Any:
    """Per-image outputs (each `blocks` rows) back in the pipeline's [block][image] order.

    Denoisers return `(sample,)` or an output with `sample`; ControlNets return
    `(down_block_residuals, mid_block_residual)` or an output with those: every tensor in
    them is per image."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_join([o[i] for o in outputs], n, blocks) for i in range(len(first)))
    # diffusers' BaseOutput (an ordered dict of its fields), e.g. UNet2DConditionOutput.
    return type(first)(**{k: _join([o[k] for o in outputs], n, blocks) for k in first})


def _join(parts: list[Any], n: int, blocks: int) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return _interleave(parts, n, blocks)
    if isinstance(parts[0], list | tuple):
        return type(parts[0])(_join([p[i] for p in parts], n, blocks)
                              for i in range(len(parts[0])))
    return parts[0]


def _interleave(parts: list[torch.Tensor], n: int, blocks: int) -> torch.Tensor:
    stacked = torch.stack(parts)  # (n, blocks, ...)
    return stacked.transpose(0, 1).reshape(n * blocks, *stacked.shape[2:])
