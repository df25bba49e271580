"""Measuring the companions with the judge: the inpainting model, the style LoRA and the
canny ControlNet. Each returns plain figures (fractions) and the images it judged.

Contract:
- `measure_inpaint(pipe, n)`: a world picture, a mask over its shape (the shape's box,
  grown by a third), and a prompt asking for another colour (and, every other time,
  another shape) at the same place. Figures: `colour` (the judged shape colour is the
  prompt's), `background` and `kept` (the fraction of pixels outside the mask, its rim
  excepted, whose palette colour is the original's; `kept_95`: images where that is
  >= 95 %).
- `measure_lora(pipe, folder, grid)`: the same prompts and seeds with the LoRA at scale 0
  (`max_diff_scale0`: largest pixel difference from the base model without the LoRA; 0 is
  exact) and at scale 1; `outline_scale0` / `outline_scale1`: fraction judged outlines;
  `background_scale1`, `colour_scale1`, `position_scale1`: what still follows the prompt.
- `measure_controlnet(pipe, net, n)`: scenes placed and sized anywhere; the prompt names
  the colours and the shape only; the control image is the scene's canny edges. Figures:
  `box_iou` (mean IoU of the judged shape's box with the true one), `box_iou_50` (fraction
  with IoU >= 0.5), the same without the ControlNet (`*_without`), and colour accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from serve_app.training import judge as judging
from serve_app.training import world
from serve_app.training.controlnet import control_image
from serve_app.training.evaluate import DEFAULTS, generate
from serve_app.training.models import IMAGE_SIZE


def _mask_for(scene: world.Scene, px: int) -> np.ndarray:
    x0, y0, x1, y1 = world.box(scene, px)
    grow = (x1 - x0) / 6
    mask = np.zeros((px, px), bool)
    mask[max(0, int(y0 - grow)):int(np.ceil(y1 + grow)),
         max(0, int(x0 - grow)):int(np.ceil(x1 + grow))] = True
    return mask


def _kept(out: Image.Image, original: Image.Image, mask: np.ndarray) -> float:
    outside = ~_dilate(mask, 2)
    a = judging.nearest_colour(np.asarray(out.convert("RGB")).reshape(-1, 3))
    b = judging.nearest_colour(np.asarray(original.convert("RGB")).reshape(-1, 3))
    return float((a == b)[outside.reshape(-1)].mean())


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


@torch.no_grad()
def measure_inpaint(pipe: StableDiffusionInpaintPipeline, n: int = 60, seed: int = 7,
                    **kwargs: Any) -> tuple[dict[str, float], list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    prompts, images, masks, truths, originals = [], [], [], [], []
    for i in range(n):
        scene = world.random_scene(rng, jitter=False)
        colours = [c for c in world.COLOURS if c not in (scene.colour, scene.background)]
        shape = scene.shape if i % 2 else world.SHAPES[(world.SHAPES.index(scene.shape) + 1) % 3]
        target = replace(scene, colour=colours[rng.integers(len(colours))], shape=shape)
        original = world.render(scene, IMAGE_SIZE)
        mask = _mask_for(scene, IMAGE_SIZE)
        prompts.append(world.full_caption(target, rng))
        images.append(original)
        masks.append(Image.fromarray((mask * 255).astype(np.uint8)))
        truths.append(target.attributes())
        originals.append((original, mask))
    outs = generate(pipe, prompts, [seed + i for i in range(n)], image=images,
                    mask_image=masks, strength=1.0, **kwargs)
    verdicts = [judging.judge(o) for o in outs]
    kept = [_kept(o, orig, m) for o, (orig, m) in zip(outs, originals, strict=True)]
    scores = judging.score(verdicts, [{k: t[k] for k in ("colour", "background", "shape")}
                                      for t in truths])
    figures = {**scores, "kept": float(np.mean(kept)),
               "kept_95": float(np.mean([k >= 0.95 for k in kept]))}
    return figures, outs, prompts


@torch.no_grad()
def measure_lora(pipe: StableDiffusionPipeline, folder: Path,
                 grid: Sequence[tuple[str, dict[str, str]]], seed: int = 0,
                 **kwargs: Any) -> tuple[dict[str, float], list[Image.Image]]:
    prompts = [p for p, _ in grid]
    seeds = [seed + i for i in range(len(prompts))]
    base = generate(pipe, prompts, seeds, **kwargs)
    pipe.load_lora_weights(str(folder), adapter_name="style")
    try:
        pipe.set_adapters(["style"], adapter_weights=[0.0])
        zero = generate(pipe, prompts, seeds, **kwargs)
        pipe.set_adapters(["style"], adapter_weights=[1.0])
        one = generate(pipe, prompts, seeds, **kwargs)
    finally:
        pipe.delete_adapters(["style"])
    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
               for a, b in zip(base, zero, strict=True))
    verdicts = [judging.judge(im) for im in one]
    scores = judging.score(verdicts, [{k: t[k] for k in ("background", "colour", "position")}
                                      for _, t in grid])
    figures = {"max_diff_scale0": float(diff),
               "outline_scale0": float(np.mean([judging.is_outline(im) for im in zero])),
               "outline_scale1": float(np.mean([judging.is_outline(im) for im in one])),
               **{f"{k}_scale1": v for k, v in scores.items()}}
    return figures, zero + one


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def measure_controlnet(pipe: StableDiffusionPipeline, net: ControlNetModel, n: int = 60,
                       seed: int = 11, **kwargs: Any
                       ) -> tuple[dict[str, float], list[Image.Image], list[Image.Image]]:
    rng = np.random.default_rng(seed)
    scenes = [world.wide_scene(rng) for _ in range(n)]
    prompts = [f"a {s.colour} {s.shape} on a {s.background} background" for s in scenes]
    controls = [control_image(world.render(s, IMAGE_SIZE)) for s in scenes]
    seeds = [seed + i for i in range(n)]
    control_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=net)
    with_net = generate(control_pipe, prompts, seeds, image=controls, **kwargs)
    without = generate(pipe, prompts, seeds, **kwargs)
    figures: dict[str, float] = {}
    for name, outs in (("", with_net), ("_without", without)):
        ious = []
        for scene, out in zip(scenes, outs, strict=True):
            found = judging.bounding_box(out)
            ious.append(0.0 if found is None else _iou(found, world.box(scene, IMAGE_SIZE)))
        verdicts = [judging.judge(o) for o in outs]
        colours = judging.score(verdicts, [{"colour": s.colour, "background": s.background}
                                           for s in scenes])
        figures.update({f"box_iou{name}": float(np.mean(ious)),
                        f"box_iou_50{name}": float(np.mean([i >= 0.5 for i in ious])),
                        **{f"{k}{name}": v for k, v in colours.items()}})
    return figures, with_net, controls


def defaults() -> dict[str, Any]:
    return {"steps": DEFAULTS["steps"], "guidance_scale": DEFAULTS["guidance_scale"],
            "sampler": DEFAULTS["sampler"], "size": DEFAULTS["width"]}
