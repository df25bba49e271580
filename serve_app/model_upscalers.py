"""Upscaler entries of the registry (`upscalers:`), and the resamplers every service has
without one. Torch-free: the ingress lists them, the replica loads what `ref()` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve_app.messages import UpscalerRef
from serve_app.model_runtime import Strict
from serve_app.settings import Settings

# Resamplers every service has, without weights (PIL): not listed in the registry.
BUILTIN_UPSCALERS: tuple[str, ...] = ("lanczos", "nearest")


class UpscalerSpec(Strict):
    """A model upscaler (`upscalers:` in the registry; `serve_app.generation.upscalers`):
    a super-resolution weights file (ESRGAN-family `.pth`/`.safetensors`, or any
    architecture spandrel knows when it is installed), path relative to MODEL_PATH or
    absolute; or `tiny-esrgan`, the seeded test model built locally. `scale` is the
    model's own factor (read from the weights; stated here for listings before load).
    Tiles are in input pixels (see `serve_app.generation.tiling`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+ -]{0,63}$")
    description: str = ""
    source: Literal["path", "tiny-esrgan"] = "path"
    path: str | None = None
    scale: int = Field(4, ge=1, le=8)
    seed: int = Field(0, ge=0)
    tile: int = Field(256, ge=32, le=4096)
    tile_overlap: int = Field(32, ge=0, le=512)

    @model_validator(mode="after")
    def _sourced(self) -> UpscalerSpec:
        if self.source == "path" and not self.path:
            raise ValueError("an upscaler with source 'path' needs a 'path'")
        if self.source != "path" and self.path:
            raise ValueError(f"an upscaler with source {self.source!r} takes no 'path'")
        if self.name.lower() in BUILTIN_UPSCALERS:
            raise ValueError(f"upscaler name {self.name!r} is a built-in one")
        return self

    def weights_path(self, settings: Settings) -> Path:
        if self.source != "path":
            return Path(settings.cache_dir) / "upscalers" / f"{self.name}.safetensors"
        path = Path(str(self.path)).expanduser()
        return path if path.is_absolute() else Path(settings.model_path) / path

    def present(self, settings: Settings) -> bool:
        return self.source != "path" or self.weights_path(settings).is_file()

    def ref(self) -> UpscalerRef:
        return UpscalerRef(self.name, self.source, self.path or "", self.seed, self.tile,
                           self.tile_overlap)
