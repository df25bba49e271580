"""The opt-in speed-ups (serve_app/generation/speedups.py) on the embedded tiny model: fused
q/k/v and int8 weights change the image by rounding only, the combinations that cannot work
are refused at load with what to do, and torch.compile's artifacts saved by one process let
a fresh process skip compiling."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.errors import ConfigError
from serve_app.generation import speedups
from serve_app.generation.runner import ModelRunner
from serve_app.registry import load_registry
from serve_app.settings import Settings
from tests.support.generation import make_task, tiny_settings, tiny_spec


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


def image(runner: ModelRunner) -> np.ndarray:
    data = runner.generate(make_task(steps=6, width=64, height=64)).images[0]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def plain(settings: Settings) -> np.ndarray:
    return image(ModelRunner(tiny_spec(runtime={"batch_invariant": False}), settings))


def test_fused_qkv_projections_make_the_same_image_up_to_rounding(
        settings: Settings, plain: np.ndarray) -> None:
    runner = ModelRunner(tiny_spec(runtime={"fuse_qkv": True, "batch_invariant": False}),
                         settings)
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in runner.pipeline.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(a.fused_projections for a in attentions)
    assert np.abs(image(runner) - plain).max() <= 2


def test_int8_weights_change_the_image_a_little(settings: Settings, plain: np.ndarray) -> None:
    runner = ModelRunner(tiny_spec(runtime={"quantize": "int8_weight_only",
                                            "batch_invariant": False}), settings)
    linears = [m for m in runner.pipeline.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__module__.startswith("torchao") for m in linears)
    quantized = image(runner)
    assert 0 < np.abs(quantized - plain).mean() < 8


@pytest.mark.parametrize(("runtime", "message"), [
    ({"quantize": "int8_weight_only"}, "needs batch_invariant: false"),
    ({"quantize": "fp8", "batch_invariant": False}, "fp8 needs a CUDA GPU"),
])
def test_speedups_that_cannot_work_here_are_refused_at_load(
        settings: Settings, runtime: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelRunner(tiny_spec(runtime=runtime), settings)


def test_fused_projections_and_loras_are_refused_together(settings: Settings) -> None:
    spec = load_registry("config/models.yaml").get("tiny-sd")
    assert spec is not None and spec.loras
    fused = spec.model_copy(update={"runtime": spec.runtime.model_copy(
        update={"fuse_qkv": True})})
    with pytest.raises(ConfigError, match="fuse_qkv cannot be combined with LoRAs"):
        ModelRunner(fused, settings)


def test_the_attention_backend_is_pinned_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention as attention

    chosen: list[Any] = []
    real = attention.sdpa_kernel
    monkeypatch.setattr(attention, "sdpa_kernel", lambda b: chosen.append(b) or real(b))
    with speedups.attention_kernels("math", "cuda"):
        pass
    with speedups.attention_kernels("flash", "cpu"), speedups.attention_kernels("auto", "cuda"):
        pass
    assert chosen == [attention.SDPBackend.MATH]


class FakeCompiler:
    """torch.compiler's artifact calls, recorded; compiling for real takes ~40 s a process
    here (bench/gpu.py measures the real thing, a second process reusing the cache)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torch._dynamo.utils import counters

        self.counters = counters
        self.loaded: list[bytes] = []
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", self.loaded.append)
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                            lambda: (f"artifacts-{self.graphs}".encode(), None))

    @property
    def graphs(self) -> int:
        return int(self.counters["stats"]["unique_graphs"])

    def compile_a_graph(self) -> None:
        self.counters["stats"]["unique_graphs"] += 1


def test_compiled_artifacts_are_saved_when_new_and_loaded_by_the_next_replica(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = FakeCompiler(monkeypatch)
    store = speedups.FolderArtifacts(tmp_path / "compile")
    first = speedups.CompileCache(store, "tiny-sd", "cpu")
    assert first.key == f"tiny-sd-torch{torch.__version__}-cpu.bin"
    assert first.load() is False and compiler.loaded == []
    assert first.save() is False  # nothing compiled yet: nothing written
    compiler.compile_a_graph()
    assert first.save() is True
    assert first.save() is False  # the same graphs: not written again
    saved = (tmp_path / "compile" / first.key).read_bytes()
    assert saved == f"artifacts-{compiler.graphs}".encode()

    second = speedups.CompileCache(store, "tiny-sd", "cpu")  # a replica scaled up later
    assert second.load() is True and compiler.loaded == [saved]


def test_an_unreadable_artifact_store_costs_a_compile_not_the_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCompiler(monkeypatch)

    class Down:
        def get(self, key: str) -> bytes | None:
            raise OSError("the blob store did not answer")

        def put(self, key: str, data: bytes) -> None:
            raise OSError("the blob store did not answer")

    cache = speedups.CompileCache(Down(), "m", "cpu")
    assert cache.load() is False
