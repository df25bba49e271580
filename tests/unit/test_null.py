"""The null model source: a replica with no model, for measuring the service's own cost."""

from __future__ import annotations

import io

from PIL import Image

from serve_app.generation.null import NullRunner
from serve_app.registry import parse_registry
from tests.support.generation import make_task


def null_spec(step_ms: float = 0.0):  # type: ignore[no-untyped-def]
    registry = parse_registry({"models": [{
        "id": "null", "name": "Null", "description": "no model", "source": "null",
        "runtime": {"null_step_ms": step_ms}}]})
    return registry.models[0]


def test_a_null_model_reports_every_step_and_answers_a_png_per_image() -> None:
    spec = null_spec()
    assert spec.weights_present  # nothing to find on disk
    steps: list[tuple[int, int]] = []
    tasks = [make_task(job_id=f"j{i}", steps=30, num_images=2, seed=i) for i in range(3)]
    results = NullRunner(spec).generate_batch(tasks, lambda s, t: steps.append((s, t)))
    assert steps == [(s, 30) for s in range(1, 31)]
    assert [r.job_id for r in results] == ["j0", "j1", "j2"]
    assert [r.seeds for r in results] == [t.seeds for t in tasks]
    for result in results:
        assert len(result.images) == 2
        assert Image.open(io.BytesIO(result.images[0])).size == (1, 1)


def test_a_null_model_stops_when_asked_and_can_take_time_per_step() -> None:
    import pytest

    from serve_app.generation.null import Interrupted

    runner = NullRunner(null_spec(step_ms=5))
    with pytest.raises(Interrupted):
        runner.generate(make_task(steps=50), None, lambda: True)
    result = runner.generate(make_task(steps=4))
    assert result.time_taken_ms >= 20
