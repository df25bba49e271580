"""`LoraSet`: a model's registry LoRAs on its loaded pipeline, switched per call.

Contract:
- Each LoRA (a registry one, or a file of the model's `lora_dirs`: serve_app.lora_folders)
  is loaded once per replica, on the first task that names it, with diffusers'
  `load_lora_weights(..., adapter_name=<its registry name>)`: PEFT wraps the targeted
  linear layers of the denoiser (and text encoders, when the file has them), keeping the
  original layers inside. The img2img/inpainting pipelines derived with `from_pipe` share
  those modules, so one load serves every mode.
- `activate(loras)` before every call: with LoRAs, `set_adapters(names, weights)` in name
  order (the others stay loaded and inactive); without, `disable_lora()`, under which each wrapped
  layer runs exactly its original layer, so the image is byte-identical to one made by a
  replica that never loaded a LoRA (tests/unit/test_loras.py checks it).
- After a load, the denoiser's new linear layers (PEFT's `lora_A`/`lora_B`) are made
  batch-invariant like the rest (`BatchInvariantDenoiser.refresh`), so a batched job with
  LoRAs still makes the image it makes alone.
- A file that does not fit the model (another family, another format than its registry
  entry says) fails the job with `ModelNotAvailable` naming the LoRA; nothing stays loaded.
- At most `max_loaded_loras` stay loaded (IMAGEGEN_MAX_LOADED_LORAS, 16): loading one more
  first deletes the least recently used adapter the call does not need.
Not thread-safe: the runner calls it under its lock.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from diffusers import DiffusionPipeline
from safetensors import safe_open

from serve_app.errors import InvalidRequest, ModelNotAvailable
from serve_app.generation.tiny_adapters import ensure_tiny_lora
from serve_app.lora_folders import find_lora
from serve_app.model_adapters import LORA_SUFFIX, LoraSpec
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

log = logging.getLogger(__name__)

Loras = tuple[tuple[str, float], ...]
# Leading key parts of each format: kohya (sd-scripts) and diffusers/PEFT.
_KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_")
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder", "transformer.")


class LoraSet:
    """See the module docstring. `after_load` runs after each new LoRA is in place."""

    def __init__(self, spec: ModelSpec, settings: Settings, pipe: DiffusionPipeline,
                 denoiser_attr: str, after_load: Callable[[], None]) -> None:
        self.spec = spec
        self.settings = settings
        self.pipe = pipe
        self.denoiser_attr = denoiser_attr
        self.after_load = after_load
        self.loaded: list[str] = []  # in load order
        self._used: dict[str, int] = {}  # name -> the activation that last used it
        self._tick = 0

    def activate(self, loras: Loras) -> None:
        """Make exactly `loras` (name, scale) active for the next call."""
        if not loras:
            if self.loaded:
                self.pipe.disable_lora()
            return
        wanted = {name for name, _ in loras}
        self._tick += 1
        for name, _ in loras:
            if name not in self.loaded:
                self._make_room(wanted)
                self._load(name)
            self._used[name] = self._tick
        # PEFT adds the adapters' outputs in the order given: by name, so the same set
        # makes the same bits however a request orders it.
        ordered = sorted(loras)
        self.pipe.enable_lora()
        self.pipe.set_adapters([n for n, _ in ordered], adapter_weights=[s for _, s in ordered])

    def _make_room(self, keep: set[str]) -> None:
        """Past `max_loaded_loras`, unload the least recently used LoRAs not in `keep`."""
        cap = self.settings.max_loaded_loras
        idle = sorted((n for n in self.loaded if n not in keep), key=lambda n: self._used[n])
        for name in idle:
            if len(self.loaded) < cap:
                return
            self.pipe.delete_adapters(name)
            self.loaded.remove(name)
            del self._used[name]
            log.info("model %s: unloaded LoRA %s (least recently used)", self.spec.id, name)

    def _load(self, name: str) -> None:
        lora = find_lora(self.spec, name, self.settings.model_path)
        if lora is None:
            valid = ", ".join(lo.name for lo in self.spec.loras) or "none"
            raise InvalidRequest(f"unknown LoRA {name!r} for model {self.spec.id!r}; "
                                 f"its LoRAs: {valid}")
        weights = self._weights(lora)
        try:
            with warnings.catch_warnings():
                # PEFT warns on every adapter after the first: several is the point here.
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                self.pipe.load_lora_weights(str(weights.parent), weight_name=weights.name,
                                            adapter_name=name, local_files_only=True)
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            with contextlib.suppress(Exception):  # a half-made adapter must not linger
                self.pipe.delete_adapters(name)
            raise ModelNotAvailable(
                f"LoRA {name!r} cannot be loaded on model {self.spec.id!r} (a "
                f"{self.spec.pipeline} model): {exc}. Is it a LoRA for this family?"
            ) from exc
        self.loaded.append(name)
        self.after_load()
        log.info("model %s: loaded LoRA %s from %s", self.spec.id, name, weights)

    def _weights(self, lora: LoraSpec) -> Path:
        path = self.spec.adapter_path(lora, self.settings)
        if lora.source == "tiny-lora":
            return ensure_tiny_lora(path, self.pipe, self.denoiser_attr, lora.seed)
        weights = _single_file(path, lora.name)
        found = lora_format(weights)
        if found != lora.format:
            raise ModelNotAvailable(
                f"LoRA {lora.name!r}: {weights} looks like a {found} LoRA, but its registry "
                f"entry says format: {lora.format}; fix the entry (diffusers or kohya)")
        return weights


def lora_format(weights: Path) -> str:
    """`kohya`, `diffusers` or `unknown`, from the file's tensor names."""
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(_DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    return "unknown"


def _single_file(path: Path, name: str) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob(f"*{LORA_SUFFIX}")) if path.is_dir() else []
    if len(found) != 1:
        raise ModelNotAvailable(
            f"LoRA {name!r}: {path} must be a {LORA_SUFFIX} file or a folder holding exactly "
            f"one (found {len(found)})")
    return found[0]
