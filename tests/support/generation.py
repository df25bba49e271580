"""Shared helpers for the generation tests (tiny model, tasks, image bytes).

Fixtures live in each test module and call these, all building into one session folder,
so the tiny model is built once per session (`ensure_tiny_model` is idempotent) however
many modules use it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_app.messages import GenerationTask, InputImage, JobType
from serve_app.registry import ModelSpec
from serve_app.settings import Settings


def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.getbasetemp() / "generation"
    return Settings(
        cache_dir=str(root / "models"),
        data_dir=str(root / "data"),
        model_path=str(root / "weights"),
    )


def tiny_spec(model_id: str = "tiny-sd", source: str = "tiny", **fields: Any) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        name=f"Tiny ({source})",
        description="seeded random weights, built locally",
        source=source,  # type: ignore[arg-type]
        **fields,
    )


def make_task(**overrides: Any) -> GenerationTask:
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "mode": JobType.TEXT2IMG,
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 42,
        "sampler": "euler_a",
    }
    fields.update(overrides)
    return GenerationTask(**fields)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on `n` CPU threads inside the block, as many as before after it."""
    import torch  # here, so modules that only build tasks stay free of torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def input_image(image: Image.Image) -> InputImage:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return InputImage(png=buffer.getvalue(), width=image.width, height=image.height)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 128, np.float32),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def kohya_copy(diffusers_file: Path, target: Path) -> None:
    """The same weights under kohya (sd-scripts) names, as community LoRAs ship."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    for key, tensor in load_file(str(diffusers_file)).items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        if kind.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]))  # alpha = rank: scale 1
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target))
