"""Upscalers: the built-in ESRGAN loader's key formats, tiling (exact with enough overlap,
bounded memory), sizes, resamplers, stopping between tiles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.errors import ConfigError
from serve_app.generation.esrgan import (
    TINY_RECEPTIVE_RADIUS,
    TINY_SHAPE,
    RRDBNet,
    Shape,
    build_tiny_esrgan,
    load_esrgan,
    shape_of,
    to_new_arch,
)
from serve_app.generation.steps import Interrupted
from serve_app.generation.tiling import spans, upscale_tiled
from serve_app.generation.upscalers import Upscalers, load_upscaler, upscale_image
from serve_app.messages import UpscalerRef
from serve_app.settings import Settings

TINY = UpscalerRef("tiny-esrgan", source="tiny-esrgan", tile=48, tile_overlap=40)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((width, height), Image.Resampling.BICUBIC)


def _old_arch(state: dict[str, torch.Tensor], ups: int) -> dict[str, torch.Tensor]:
    """New-arch keys written the way the original ESRGAN release names them."""
    out = {}
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    for key, value in state.items():
        if m := re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(\w+)", key):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
        elif key.startswith("conv_body."):
            out[f"model.1.sub.{blocks}.{key.split('.')[1]}"] = value
        elif key.startswith("conv_first."):
            out[f"model.0.{key.split('.')[1]}"] = value
        elif m := re.match(r"conv_up(\d)\.(\w+)", key):
            out[f"model.{3 * int(m[1])}.{m[2]}"] = value
        elif key.startswith("conv_hr."):
            out[f"model.{3 * ups + 2}.{key.split('.')[1]}"] = value
        elif key.startswith("conv_last."):
            out[f"model.{3 * ups + 4}.{key.split('.')[1]}"] = value
    return out


def _bsrgan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = [(r"^body\.(\d+)\.rdb(\d)", r"RRDB_trunk.\1.RDB\2"), (r"^conv_body", "trunk_conv"),
               (r"^conv_up(\d)", r"upconv\1"), (r"^conv_hr", "HRconv")]
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize("shape", [TINY_SHAPE, Shape(feat=8, blocks=2, grow=4, ups=1),
                                   Shape(feat=8, blocks=1, grow=4, ups=2, unshuffle=2)])
def test_every_key_format_loads_the_same_network(shape: Shape) -> None:
    torch.manual_seed(0)
    net = RRDBNet(shape).eval()
    state = net.state_dict()
    x = torch.rand(1, 3, 12, 16)
    with torch.inference_mode():
        expected = net(x)
    for variant in (state, {"params_ema": state}, _old_arch(state, shape.ups), _bsrgan(state)):
        loaded = load_esrgan(dict(variant))
        assert loaded.shape == shape
        with torch.inference_mode():
            assert torch.equal(loaded(x), expected)
    assert expected.shape[-2:] == (12 * shape.scale, 16 * shape.scale)


def test_shape_of_reads_real_esrgan_x4plus_layout() -> None:
    """RealESRGAN_x4plus: 64 features, 23 blocks, growth 32, two x2 stages."""
    state = {k: v for k, v in RRDBNet(Shape()).state_dict().items()}
    assert shape_of(to_new_arch({"params_ema": state})) == Shape()
    assert Shape().scale == 4


def test_a_state_dict_of_another_architecture_is_refused_with_its_missing_key() -> None:
    with pytest.raises(ConfigError, match=r"conv_first\.weight"):
        load_esrgan({"encoder.weight": torch.zeros(1)})


def test_spans_cover_the_length_in_tiles_of_at_most_the_size() -> None:
    assert spans(100, 48) == [(0, 33), (33, 67), (67, 100)]
    assert spans(10, 48) == [(0, 10)]


def test_tiled_output_equals_untiled_with_overlap_beyond_the_receptive_field(
        settings: Settings) -> None:
    assert TINY.tile_overlap / 2 >= TINY_RECEPTIVE_RADIUS
    image = _image(100, 72)
    upscalers = Upscalers(settings)
    whole = upscalers.upscale(image, TINY.__class__(**{**TINY.__dict__, "tile": 4096}),
                              400, 288)
    ticks: list[tuple[int, int]] = []
    tiled = upscalers.upscale(image, TINY, 400, 288,
                              progress=lambda done, total: ticks.append((done, total)) or False)
    assert ticks == [(i, 6) for i in range(1, 7)]  # 3 x 2 tiles
    diff = np.abs(np.asarray(whole, np.int16) - np.asarray(tiled, np.int16))
    # Float reassociation across tensor sizes may move a value across a rounding edge.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001


def test_small_overlap_differs_only_near_seams(settings: Settings) -> None:
    image = _image(96, 48)
    upscalers = Upscalers(settings)
    whole = np.asarray(upscalers.upscale(
        image, UpscalerRef("tiny-esrgan", "tiny-esrgan", tile=4096), 384, 192), np.int16)
    tiled = np.asarray(upscalers.upscale(
        image, UpscalerRef("tiny-esrgan", "tiny-esrgan", tile=48, tile_overlap=2), 384, 192),
        np.int16)
    seam_x = 48 * 4  # one vertical seam, at input x 48
    far = np.ones(whole.shape[:2], bool)
    reach = (TINY_RECEPTIVE_RADIUS + 2) * 4
    far[:, seam_x - reach: seam_x + reach] = False
    assert np.abs(whole - tiled)[far].max() == 0
    assert np.abs(whole - tiled)[~far].max() > 1  # the seam band is where tiles differ


@pytest.mark.parametrize("size", [(400, 288), (200, 144), (123, 77), (800, 576)])
def test_model_upscaler_makes_exactly_the_requested_size(settings: Settings,
                                                         size: tuple[int, int]) -> None:
    out = Upscalers(settings).upscale(_image(100, 72), TINY, *size)
    assert out.size == size and out.mode == "RGB"


@pytest.mark.parametrize("name", ["lanczos", "nearest"])
def test_resamplers_match_pil(settings: Settings, name: str) -> None:
    image = _image(50, 30)
    out = Upscalers(settings).upscale(image, name, 100, 60)
    method = Image.Resampling.LANCZOS if name == "lanczos" else Image.Resampling.NEAREST
    assert out.tobytes() == image.resize((100, 60), method).tobytes()


def test_stopping_between_tiles_raises_interrupted(settings: Settings) -> None:
    calls = []
    with pytest.raises(Interrupted, match="2 of 6"):
        Upscalers(settings).upscale(_image(100, 72), TINY, 400, 288,
                                    progress=lambda d, t: calls.append(d) or d == 2)
    assert calls == [1, 2]


def test_the_tiny_esrgan_is_built_once_and_seeded(tmp_path: Path) -> None:
    a = build_tiny_esrgan(tmp_path / "a.safetensors", seed=0)
    b = build_tiny_esrgan(tmp_path / "b.safetensors", seed=0)
    assert a.read_bytes() == b.read_bytes()
    assert load_upscaler(a).scale == 4


def test_a_fake_model_is_tiled_and_blended_without_the_model_seeing_the_whole_image() -> None:
    seen: list[tuple[int, int]] = []

    def doubler(tile: np.ndarray) -> np.ndarray:
        seen.append(tile.shape[:2])
        return np.repeat(np.repeat(tile, 2, axis=0), 2, axis=1)

    pixels = np.asarray(_image(300, 200))
    out = upscale_tiled(pixels, doubler, 2, (600, 400), tile=64, overlap=16)
    assert max(h for h, _ in seen) <= 64 + 32 and max(w for _, w in seen) <= 64 + 32
    assert np.array_equal(out, np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1))


_MEMORY_SCRIPT = """
import os, sys, threading, time, numpy as np
from serve_app.generation.tiling import upscale_tiled

def rss():  # resident bytes now (ru_maxrss would include the imports' own peak)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

side = int(sys.argv[1])
image = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
def model(tile):  # x4, as cheap as a model can be: the tiler's own memory is measured
    return np.repeat(np.repeat(tile, 4, axis=0), 4, axis=1)
base, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
out = upscale_tiled(image, model, 4, (2 * side, 2 * side), tile=256, overlap=32)
done.set()
sampler.join()
assert out.shape == (2 * side, 2 * side, 3)
print((max(peak[0], rss()) - base) // 2**20)
"""


def test_tiling_memory_is_the_output_plus_one_tile_for_a_2048_square_by_two() -> None:
    """Peak RSS growth while a 2048 x 2048 image is upscaled x2 through a x4 model, tiles
    of 256 px: the output is 48 MiB, one tile's x4 output and its resampling under 10 MiB.
    (With the tiny ESRGAN's activations: 477 MiB at this tile size, docs/upscaling.md.)"""
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "2048"],
                          capture_output=True, text=True, check=True, timeout=600)
    grown_mib = int(done.stdout.strip().splitlines()[-1])
    assert grown_mib < 100, f"peak RSS grew by {grown_mib} MiB"


def test_upscale_image_keeps_model_upscalers_loaded_per_process(settings: Settings) -> None:
    """The entry point the hires fix shares: a name or a registry ref, the exact size."""
    image = _image(40, 24)
    first = upscale_image(image, TINY, 80, 48, settings=settings)
    again = upscale_image(image, TINY, 80, 48, settings=settings)
    assert first.size == (80, 48) and first.tobytes() == again.tobytes()
    assert upscale_image(image, "nearest", 120, 72, settings=settings).size == (120, 72)


def test_spandrel_loads_the_weights_when_it_is_importable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in with spandrel's API (`ModelLoader(device).load_from_file(path)` giving an
    `ImageModelDescriptor` with `scale`, `size_requirements.multiple_of`, `eval()` and a
    call on N x 3 x H x W): spandrel is not installable beside the CPU torch here."""
    import types

    loaded: list[str] = []

    class ImageModelDescriptor:
        scale = 2
        size_requirements = types.SimpleNamespace(multiple_of=4)

        def eval(self) -> ImageModelDescriptor:
            return self

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    class ModelLoader:
        def __init__(self, device: torch.device) -> None:
            assert device == torch.device("cpu")

        def load_from_file(self, path: str) -> ImageModelDescriptor:
            loaded.append(path)
            return ImageModelDescriptor()

    fake = types.ModuleType("spandrel")
    fake.ModelLoader = ModelLoader  # type: ignore[attr-defined]
    fake.ImageModelDescriptor = ImageModelDescriptor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spandrel", fake)
    weights = tmp_path / "swinir.pth"
    weights.write_bytes(b"")
    model = load_upscaler(weights)
    assert (model.loader, model.scale, model.multiple, loaded) == ("spandrel", 2, 4,
                                                                   [str(weights)])
    settings = Settings(cache_dir=str(tmp_path), model_path=str(tmp_path), store="memory")
    image = _image(30, 18)  # not multiples of 4: padded, then cropped
    out = Upscalers(settings).upscale(image, UpscalerRef("swinir", "path", "swinir.pth"), 60, 36)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((60, 36),
                                                                   Image.Resampling.NEAREST)))
