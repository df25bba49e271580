"""`ControlNets`: a model's registry ControlNets and the pipelines that run them.

Contract:
- Each ControlNet is loaded once per replica, on the first task that names it
  (`ControlNetModel.from_pretrained`, or the seeded tiny one built on first use), onto the
  model's device and dtype.
- Its text2img and img2img pipelines are derived from the loaded base pipeline with
  `AutoPipelineFor*.from_pipe(base, controlnet=net)` (SD 1.x:
  `StableDiffusionControlNet[Img2Img]Pipeline`, SDXL: the XL ones), which share every
  module of the base: no copy of the UNet, the text encoders or the VAE.
- Batch invariance: the net is made batch-invariant like the denoiser
  (`BatchInvariantDenoiser`), so the images of a `numImages` > 1 job equal the same seeds
  made alone. ControlNet jobs never share a call with other jobs (their `batch_key` is
  None: each carries its own control image).
- `control_image` prepares what the net sees: the task's control image resized to the
  output size, then, with `preprocess: canny`, OpenCV's Canny edges (white on black, three
  channels), with the thresholds most tools default to (100, 200).
Not thread-safe: the runner calls it under its lock.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
)
from PIL import Image

from serve_app.errors import InvalidRequest, ModelNotAvailable
from serve_app.generation.batching import BatchInvariantDenoiser
from serve_app.generation.images import decode_rgb, fit
from serve_app.generation.pipelines import PipelineSet, pin_execution_device
from serve_app.generation.tiny_adapters import ensure_tiny_controlnet
from serve_app.messages import ControlInput, JobType
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

CANNY_LOW, CANNY_HIGH = 100, 200
_AUTO = {JobType.TEXT2IMG: AutoPipelineForText2Image,
         JobType.IMG2IMG: AutoPipelineForImage2Image}


class ControlNets:
    """See the module docstring."""

    def __init__(self, spec: ModelSpec, settings: Settings, pipes: PipelineSet, device: str,
                 dtype: torch.dtype, batch_invariant: bool = True) -> None:
        self.spec = spec
        self.settings = settings
        self.pipes = pipes
        self.device = device
        self.dtype = dtype
        self.batch_invariant = batch_invariant
        self._nets: dict[str, BatchInvariantDenoiser] = {}
        self._pipelines: dict[tuple[str, JobType], DiffusionPipeline] = {}

    def set_blocks(self, blocks: int) -> None:
        """What the runner sets on the denoiser's wrapper, for the nets' (same layout)."""
        for wrapper in self._nets.values():
            wrapper.blocks = blocks

    def pipeline(self, net_id: str, mode: JobType) -> DiffusionPipeline:
        """The `mode` pipeline that runs ControlNet `net_id` (derived once)."""
        if mode not in _AUTO:
            raise InvalidRequest(f"controlNet applies to text2img and img2img, not {mode.value}")
        if self.pipes.inpaint_route:
            raise InvalidRequest(f"model {self.spec.id!r} is an inpainting model: it does not "
                                 "run ControlNets")
        key = (net_id, mode)
        if key not in self._pipelines:
            pipe = _AUTO[mode].from_pipe(self.pipes.base, controlnet=self._net(net_id))
            pipe.set_progress_bar_config(disable=True)
            pin_execution_device(pipe)
            self._pipelines[key] = pipe
        return self._pipelines[key]

    def _net(self, net_id: str) -> ControlNetModel:
        if net_id not in self._nets:
            entry = self.spec.control_net(net_id)
            if entry is None:
                have = ", ".join(c.id for c in self.spec.control_nets) or "none"
                raise InvalidRequest(f"unknown ControlNet {net_id!r} for model "
                                     f"{self.spec.id!r}; its ControlNets: {have}")
            path = self.spec.adapter_path(entry, self.settings)
            if entry.source == "tiny-controlnet":
                ensure_tiny_controlnet(path, self.pipes.base.unet.config, entry.seed)
            try:
                net = ControlNetModel.from_pretrained(path, torch_dtype=self.dtype,
                                                      local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelNotAvailable(f"ControlNet {net_id!r} of model {self.spec.id!r} "
                                        f"cannot be loaded from {path}: {exc}") from exc
            net = net.to(self.device).eval()
            self._nets[net_id] = BatchInvariantDenoiser(
                net, enabled=self.batch_invariant, on_cpu=self.device == "cpu")
        return self._nets[net_id].model


def control_image(control: ControlInput, width: int, height: int) -> Image.Image:
    """The image the ControlNet sees (see the module docstring)."""
    image = fit(decode_rgb(control.image), width, height)
    if control.preprocess == "canny":
        return canny(image)
    if control.preprocess != "none":
        raise InvalidRequest(f"unknown controlNet.preprocess {control.preprocess!r}; "
                             "valid: none, canny")
    return image


def canny(image: Image.Image) -> Image.Image:
    """OpenCV's Canny edges of `image`: 255 on edges, 0 elsewhere, as RGB."""
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
