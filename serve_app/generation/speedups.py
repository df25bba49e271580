"""Opt-in speed-ups of a model's runtime (`runtime` in the registry), each one documented in
docs/models.md with what it costs and whether it changes the image:

- `quantize`: the denoiser's linear layers quantized by torchao (int8 weights; int8 weights
  and activations; fp8 on CUDA GPUs of compute capability 8.9 and up).
- `fuse_qkv`: diffusers' `fuse_qkv_projections`, one GEMM per attention for q, k and v.
- `attention_backend`: which SDPA kernels attention may use on CUDA.
- `compile` with `CompileCache`: torch.compile's artifacts (inductor's compiled graphs,
  autotuning results: torch's "mega-cache") saved after a replica compiled and loaded by the
  next replica before it compiles, so a replica scaled up from zero finds them. They live
  in the blob store every replica reaches (`compile/<key>.bin`), or, for a runner without
  one, in a folder under the cache dir.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from diffusers import DiffusionPipeline

from serve_app.blobs import Blobs
from serve_app.errors import BlobNotFound, ConfigError

log = logging.getLogger(__name__)


def quantize_denoiser(denoiser: torch.nn.Module, mode: str, device: str) -> None:
    """Quantize `denoiser`'s linear layers in place (`mode` as `runtime.quantize`)."""
    if mode == "none":
        return
    if mode == "fp8" and not (device.startswith("cuda")
                              and torch.cuda.get_device_capability() >= (8, 9)):
        raise ConfigError("runtime.quantize fp8 needs a CUDA GPU of compute capability 8.9 "
                          "or newer (L4, L40S, H100, ...); use int8_weight_only elsewhere")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        raise ConfigError("runtime.quantize needs torchao: pip install 'imagegen-serve"
                          "[quantize]' (torchao==0.18.0) on the model's nodes") from None

    config = {"int8_weight_only": Int8WeightOnlyConfig,
              "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
              "fp8": Float8DynamicActivationFloat8WeightConfig}[mode]()
    quantize_(denoiser, config)


def fuse_qkv(pipe: DiffusionPipeline) -> None:
    pipe.fuse_qkv_projections()


_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@contextmanager
def attention_kernels(backend: str, device: str) -> Iterator[None]:
    """Within it, SDPA uses only `backend`'s kernel (CUDA; elsewhere, and for `auto`, torch
    chooses as it always does)."""
    if backend == "auto" or not device.startswith("cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, _BACKENDS[backend])):
        yield


# -- compiled artifacts ------------------------------------------------------------------


class ArtifactStore(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class FolderArtifacts:
    """Artifacts as files in a folder (one node, or a folder every node mounts)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str) -> bytes | None:
        path = self.folder / key
        return path.read_bytes() if path.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.folder / key)


class BlobArtifacts:
    """Artifacts in the blob store every replica of a cluster reaches (`compile/<key>`)."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs

    def get(self, key: str) -> bytes | None:
        try:
            return self.blobs.get(f"compile/{key}")
        except BlobNotFound:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.blobs.put(f"compile/{key}", data, "application/octet-stream")


class CompileCache:
    """torch.compile's artifacts for one model on one kind of device: `load` before the
    first compiled call, `save` when this process compiled something new."""

    def __init__(self, store: ArtifactStore, model_id: str, device: str) -> None:
        self.store = store
        self.key = f"{model_id}-torch{torch.__version__}-{_device_tag(device)}.bin"
        self._graphs = 0
        self.loaded = False

    def load(self) -> bool:
        try:
            data = self.store.get(self.key)
        except Exception as exc:  # a cache that cannot be read costs a compile, no more
            log.warning("compile cache %s unreadable: %s", self.key, exc)
            return False
        if data:
            torch.compiler.load_cache_artifacts(data)
            self.loaded = True
            log.info("compile cache %s loaded (%d bytes)", self.key, len(data))
        self._graphs = _compiled_graphs()
        return self.loaded

    def save(self) -> bool:
        """Save this process's artifacts if it compiled a graph since the last save."""
        graphs = _compiled_graphs()
        if graphs == self._graphs:
            return False
        self._graphs = graphs
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        try:
            self.store.put(self.key, saved[0])
        except Exception as exc:
            log.warning("compile cache %s not saved: %s", self.key, exc)
            return False
        log.info("compile cache %s saved (%d bytes)", self.key, len(saved[0]))
        return True


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _device_tag(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name().replace(" ", "_")
        return f"{name}-sm{major}{minor}"
    return "cpu"
