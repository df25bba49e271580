"""GPU checks (marker `gpu`): skipped without CUDA, so CI (CPU only) never runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_batched_images_equal_images_made_alone_on_cuda(tmp_path: Path, dtype: str) -> None:
    from serve_app.generation.runner import ModelRunner
    from serve_app.model_runtime import Runtime
    from serve_app.registry import ModelSpec
    from serve_app.settings import Settings
    from tests.support.generation import make_task

    settings = Settings(cache_dir=str(tmp_path), data_dir=str(tmp_path),
                        model_path=str(tmp_path))
    spec = ModelSpec(id="tiny-sd", name="t", description="d", source="tiny",
                     runtime=Runtime(device="cuda", dtype=dtype))  # type: ignore[arg-type]
    runner = ModelRunner(spec, settings)
    assert runner.device == "cuda"
    tasks = [make_task(job_id=str(i), seed=i, prompt=f"p{i}", width=128, height=128)
             for i in range(8)]
    batched = runner.generate_batch(tasks)
    alone = [runner.generate(t) for t in tasks]
    assert [r.images for r in batched] == [r.images for r in alone]
