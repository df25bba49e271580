"""What every training stage shares: threads and seeds, the learning-rate schedule, an EMA
of weights, and a progress bar with a time estimate.

Contract:
- `setup(threads)` pins torch to `threads` intra-op threads (each data-parallel worker's:
  1 by default, see `parallel`).
- `lr_at(step, total, peak, warmup, decay)`: linear warmup to `peak`, then cosine down to
  10 % (or `peak` throughout, without `decay`).
- `descend(optimizer, loss, parameters, ema)`: one step of every stage's loop (gradients
  averaged over the workers, clipped to norm 1, then the EMA, if any, follows).
- `Ema` keeps an exponential moving average of a module's parameters (decay ramps up
  from 0, so early averages are not dominated by the random start); `copy_to(module)`.
- `Progress` is a tqdm bar (stderr) with the stage's ETA, and also appends a line per
  `log()` call to a log file, so a background run can be followed with `tail`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from serve_app.training.parallel import average_gradients


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)


def lr_at(step: int, total: int, peak: float, warmup: int, decay: bool = True) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            parameters: Iterable[torch.nn.Parameter], ema: Ema | None = None) -> None:
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters)  # the workers' mean, if more than one
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    if ema is not None:
        ema.update()


class Ema:
    """Exponential moving average of `module`'s floating-point parameters."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters() if p.dtype.is_floating_point]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = [p for p in module.parameters() if p.dtype.is_floating_point]
        for target, source in zip(params, self.shadow, strict=True):
            target.copy_(source)

    def state_dict(self) -> dict[str, object]:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}


class Progress:
    """A stage's progress bar with ETA, mirrored as lines into `log_path`."""

    def __init__(self, stage: str, total: int, log_path: Path | None = None,
                 stream: TextIO = sys.stderr) -> None:
        self.stage = stage
        self.total = total
        self.start = time.monotonic()
        self.bar = tqdm(total=total, desc=stage, file=stream, dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.05)
        self.log_path = log_path

    def step(self, n: int = 1, **metrics: float) -> None:
        self.bar.update(n)
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def eta_s(self) -> float:
        done = max(1, self.bar.n)
        return (time.monotonic() - self.start) / done * (self.total - done)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        line = (f"[{time.strftime('%H:%M:%S')}] {self.stage} {self.bar.n}/{self.total} "
                f"elapsed {elapsed / 60:.1f} min, eta {self.eta_s() / 60:.1f} min: {message}")
        self.bar.write(line, file=sys.stderr)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.start


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
