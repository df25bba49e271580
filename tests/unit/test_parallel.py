"""The training's data-parallel workers (`serve_app.training.parallel`): two one-thread
processes on loopback take the step one process would take on their batches together,
and a run whose workers drift apart, or whose worker dies, stops with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_app.training import parallel

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _step(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ((model(x) - y) ** 2).mean().backward()
    parallel.average_gradients(model.parameters())
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker_step() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    part = parallel.share(len(X))
    rows = slice(parallel.rank() * part, (parallel.rank() + 1) * part)
    return _step(_model(), X[rows], Y[rows])


def _worker_drifts() -> None:
    model = _model()
    if parallel.rank() == 1:
        with torch.no_grad():
            model.bias[0] += 1e-6
    _step(model, X, Y)


def _worker_dies() -> None:
    if parallel.rank() == 1:
        raise SystemExit(3)
    parallel.barrier()  # would wait for worker 1 until the group's timeout


def test_two_workers_take_the_whole_batchs_step(tmp_path: Path) -> None:
    both = parallel.launch(_worker_step, 2, tmp_path)
    alone = _step(_model(), X, Y)
    assert both.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(both[name], alone[name], rtol=1e-6, atol=1e-7)
    assert not parallel.scratch(tmp_path).exists()  # cleaned up after a good run


def test_workers_whose_weights_differ_stop_the_run(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(parallel.WorkerFailed, match=r"training worker [01] failed"):
        parallel.launch(_worker_drifts, 2, tmp_path)
    assert "the training workers' weights differ after 0 steps" in capfd.readouterr().err


def test_a_dead_worker_stops_the_run_at_once(tmp_path: Path) -> None:
    with pytest.raises(parallel.WorkerFailed, match=r"worker 1 failed \(exit 3\).*worker-1.log"):
        parallel.launch(_worker_dies, 2, tmp_path)


def test_batches_and_pools_split_evenly_or_not_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parallel.share(5) == 5  # one worker: the whole batch
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    assert parallel.share(64) == 32
    with pytest.raises(ValueError, match="5 does not split evenly over 2 workers"):
        parallel.share(5)


TINY_SD = Path(__file__).parents[2] / "serve_app" / "trained" / "tiny-sd"
PROMPTS = ["a red circle on a blue background", "a small green square at the top",
           "large yellow triangle, black background", "a purple circle on the right",
           "a white square in the middle"]


def _draw() -> list[bytes]:
    from diffusers import StableDiffusionPipeline

    from serve_app.training.evaluate import generate

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, torch_dtype=torch.float32)
    return [im.tobytes() for im in generate(pipe, PROMPTS, range(10, 15), batch=2)]


def test_workers_draw_an_evaluations_images_between_them_byte_for_byte(
        tmp_path: Path) -> None:
    """Each worker draws every other image of the grid and both get all of them: the
    images one process draws, so the workers' evaluations agree with a lone run's."""
    assert parallel.launch(_draw, 2, tmp_path) == _draw()
