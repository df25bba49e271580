"""A pool replica's models: an evicted model's memory is really freed, and the ledger's
reports say what was loaded, hit and evicted."""

from __future__ import annotations

import gc
import weakref

import pytest

from serve_app.generation.pool import PooledModel, PoolLedger
from serve_app.generation.runner import ModelRunner
from serve_app.generation.worker import ModelWorker
from serve_app.messages import PoolReport
from serve_app.settings import Settings
from tests.support.generation import make_task, tiny_settings, tiny_spec


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


def _loaded(model_id: str, seed: int, settings: Settings, ledger: PoolLedger) -> PooledModel:
    runner = ModelRunner(tiny_spec(model_id, seed=seed), settings, device="cpu")
    ledger.added(model_id, 0.5)
    return PooledModel(model_id, ModelWorker(runner, replica_name=model_id),
                       ledger.released)


def test_release_frees_the_pipeline_and_tells_the_ledger(settings: Settings) -> None:
    ledger = PoolLedger()
    model = _loaded("pool-a", 1, settings, ledger)
    runner = model.worker.runner
    pipe, unet = weakref.ref(runner.pipeline), weakref.ref(runner.pipeline.unet)
    runner.generate(make_task(steps=2))  # caches (prompts, schedulers) filled, too
    del runner
    model.release()
    gc.collect()
    assert pipe() is None and unet() is None
    assert ledger.loaded == ()
    assert ledger.report("pool-b", fresh=False) == PoolReport(loaded=(), evicted=("pool-a",))
    model.release()  # Serve calls __del__ once, Python once more: the second does nothing
    with pytest.raises(RuntimeError, match="evicted"):
        _ = model.worker


def test_serves_eviction_path_frees_it_too(settings: Settings) -> None:
    """Serve's LRU pops the model and calls its `__del__`, then drops it."""
    ledger = PoolLedger()
    model = _loaded("pool-a", 1, settings, ledger)
    unet = weakref.ref(model.worker.runner.pipeline.unet)
    model.__del__()
    del model
    gc.collect()
    assert unet() is None and ledger.loaded == ()


def test_a_report_names_a_fresh_load_once_and_hits_without_seconds() -> None:
    ledger = PoolLedger()
    ledger.added("a", 1.25)
    ledger.added("b", 0.5)
    assert ledger.report("b", fresh=True) == PoolReport(loaded=("a", "b"), load_s=0.5)
    assert ledger.report("a", fresh=False) == PoolReport(loaded=("a", "b"))


def test_seeded_pool_models_make_distinct_reproducible_images(settings: Settings) -> None:
    task = make_task(steps=2)
    one = ModelRunner(tiny_spec("seed-1", seed=1), settings, device="cpu").generate(task)
    again = ModelRunner(tiny_spec("seed-1b", seed=1), settings, device="cpu").generate(task)
    two = ModelRunner(tiny_spec("seed-2", seed=2), settings, device="cpu").generate(task)
    assert one.images == again.images
    assert one.images != two.images
