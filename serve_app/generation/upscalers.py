"""Upscalers: an image to a larger size, by a resampler or a super-resolution model.

`upscale_image(image, upscaler, width, height)` is the one entry point (upscale jobs, and
the hires fix's image upscalers). `upscaler` is an `UpscalerRef` (from the registry's
`upscalers:`) or the name of a built-in resampler:

- `lanczos`, `nearest`: PIL, no model, in one resize (PIL's memory is the input and the
  output).
- a model (`source` path or tiny-esrgan): loaded once per process and device
  (`Upscalers` keeps them), through `spandrel` when it is importable (every architecture
  it knows: ESRGAN, SwinIR, HAT, DAT, ...), else through the built-in ESRGAN loader
  (`serve_app.generation.esrgan`), which reads the same weights files. The model runs at its
  own scale tile by tile (`serve_app.generation.tiling`), each tile resized to the target:
  a x4 model asked for x2 makes x4 tiles sampled down with Lanczos, and asked for x8 makes
  x4 tiles sampled up; memory stays bounded by one tile's activations plus the output.

Between tiles `progress(done, total)` is called; when it returns True the upscale stops and
`Interrupted` is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serve_app.errors import ConfigError, InvalidRequest
from serve_app.generation.esrgan import build_tiny_esrgan, load_esrgan, load_state_dict
from serve_app.generation.steps import Interrupted
from serve_app.generation.tiling import Stopped, TileProgress, upscale_tiled
from serve_app.messages import UpscalerRef
from serve_app.settings import Settings

_RESAMPLERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass
class LoadedUpscaler:
    """A model upscaler ready to run: `run` maps N x 3 x H x W floats in [0, 1] to the
    output at `scale`, whose side must be a multiple of `multiple`."""

    run: Callable[[torch.Tensor], torch.Tensor]
    scale: int
    multiple: int = 1
    loader: str = "builtin"


class Upscalers:
    """The model upscalers one process has loaded, by name (loaded on first use)."""

    def __init__(self, settings: Settings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device
        self._loaded: dict[str, LoadedUpscaler] = {}
        self._lock = threading.Lock()

    def get(self, ref: UpscalerRef) -> LoadedUpscaler:
        with self._lock:
            if ref.name not in self._loaded:
                self._loaded[ref.name] = load_upscaler(weights_file(ref, self.settings),
                                                       self.device)
            return self._loaded[ref.name]

    def upscale(self, image: Image.Image, upscaler: UpscalerRef | str, width: int,
                height: int, progress: TileProgress | None = None) -> Image.Image:
        ref = upscaler if isinstance(upscaler, UpscalerRef) else UpscalerRef(upscaler)
        if ref.source == "builtin":
            if ref.name not in _RESAMPLERS:
                raise InvalidRequest(f"Unknown upscaler {ref.name!r}; built-in ones: "
                                     f"{', '.join(_RESAMPLERS)}")
            return image.convert("RGB").resize((width, height), _RESAMPLERS[ref.name])
        model = self.get(ref)
        pixels = np.asarray(image.convert("RGB"))
        try:
            out = upscale_tiled(pixels, lambda tile: _run_tile(model, tile, self.device),
                                model.scale, (width, height), tile=ref.tile,
                                overlap=ref.tile_overlap, progress=progress)
        except Stopped as exc:
            raise Interrupted(str(exc)) from None
        return Image.fromarray(out)


_DEFAULT: dict[tuple[str, str, str], Upscalers] = {}


def upscale_image(image: Image.Image, upscaler: UpscalerRef | str, width: int, height: int,
                  *, settings: Settings, device: str = "cpu",
                  progress: TileProgress | None = None) -> Image.Image:
    """`image` upscaled to `width` x `height` (see the module docstring); model upscalers
    stay loaded in this process for the next call."""
    key = (settings.cache_dir, settings.model_path, device)
    upscalers = _DEFAULT.get(key)
    if upscalers is None:
        upscalers = _DEFAULT.setdefault(key, Upscalers(settings, device))
    return upscalers.upscale(image, upscaler, width, height, progress)


def weights_file(ref: UpscalerRef, settings: Settings) -> Path:
    """Where `ref`'s weights are; the tiny ESRGAN is built there on first use."""
    if ref.source == "tiny-esrgan":
        return build_tiny_esrgan(
            Path(settings.cache_dir) / "upscalers" / f"{ref.name}.safetensors", ref.seed)
    path = Path(ref.path).expanduser()
    path = path if path.is_absolute() else Path(settings.model_path) / path
    if not path.is_file():
        raise ConfigError(f"upscaler {ref.name!r}: no weights file at {path}")
    return path


def load_upscaler(path: Path, device: str = "cpu") -> LoadedUpscaler:
    """A super-resolution model from a weights file: spandrel when importable, else the
    built-in ESRGAN loader."""
    try:
        import spandrel  # noqa: F401  (optional: needs torchvision)
    except ImportError:
        return _load_builtin(path, device)
    return _load_spandrel(path, device)


def _load_builtin(path: Path, device: str) -> LoadedUpscaler:
    net = load_esrgan(load_state_dict(path)).to(device)
    return LoadedUpscaler(run=net, scale=net.scale, multiple=net.shape.unshuffle)


def _load_spandrel(path: Path, device: str) -> LoadedUpscaler:
    from spandrel import ImageModelDescriptor, ModelLoader

    descriptor = ModelLoader(device=torch.device(device)).load_from_file(str(path))
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ConfigError(f"{path}: spandrel loaded a {type(descriptor).__name__}, not an "
                          "image-to-image model")
    descriptor.eval()
    return LoadedUpscaler(run=descriptor, scale=descriptor.scale,
                          multiple=descriptor.size_requirements.multiple_of,
                          loader="spandrel")


def _run_tile(model: LoadedUpscaler, tile: np.ndarray, device: str) -> np.ndarray:
    """uint8 H x W x 3 -> uint8 (H*scale) x (W*scale) x 3. A side that is not a multiple
    of the model's (Real-ESRGAN x2: 2) is padded by edge replication, then cropped."""
    height, width = tile.shape[:2]
    x = torch.from_numpy(np.array(tile)).to(device).permute(2, 0, 1)[None].float() / 255.0
    pad_h, pad_w = -height % model.multiple, -width % model.multiple
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.inference_mode():
        y = model.run(x)
    y = y[0, :, :height * model.scale, :width * model.scale]
    out = (y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
    return out.cpu().numpy()
