"""Where each model runs (serve_app/placement.py): a GPU whenever the cluster has one, a CPU
only for a model whose default job fits JOB_TIMEOUT there, and a reason for every model that
cannot be served, in GET /models and in the 400 its requests get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve_app import builder as builder_module
from serve_app.builder import build_app, resolve
from serve_app.errors import ConfigError
from serve_app.placement import Cluster, cpu_seconds, place, place_all
from serve_app.registry import ModelSpec, parse_registry

GPUS = Cluster(gpus=True)
SLOW_CPU = Cluster(gpus=False, cpu_gflops=50.0)  # about one core of this project's machines
TIMEOUT_S = 300.0


def real(model_id: str = "sd15", pipeline: str = "sd", **fields: Any) -> ModelSpec:
    return ModelSpec(id=model_id, name=model_id, description="d", pipeline=pipeline,
                     path=f"/weights/{model_id}", **fields)


def tiny(**fields: Any) -> ModelSpec:
    return ModelSpec(id="tiny-sd", name="t", description="d", source="tiny", **fields)


@pytest.mark.parametrize(("pipeline", "dtype"), [
    ("sd", "float16"), ("sdxl", "float16"), ("flux", "bfloat16"), ("sd3", "bfloat16")])
def test_with_gpus_a_real_model_asks_ray_for_one_in_its_familys_half_precision(
        pipeline: str, dtype: str) -> None:
    placed, reason = place(real(pipeline=pipeline), GPUS, TIMEOUT_S)
    assert reason is None
    assert (placed.runtime.device, placed.runtime.dtype, placed.resources.num_gpus) == (
        "cuda", dtype, 1.0)


def test_what_the_registry_states_wins_over_the_defaults() -> None:
    placed, _ = place(real(resources={"num_gpus": 0.5}, runtime={"dtype": "float32"}),
                      GPUS, TIMEOUT_S)
    assert (placed.runtime.dtype, placed.resources.num_gpus) == ("float32", 0.5)
    on_cpu, reason = place(real(runtime={"device": "cpu"}), GPUS, TIMEOUT_S)
    assert reason is None and on_cpu.runtime.device == "cpu"
    assert on_cpu.resources.num_gpus == 0  # told to stay on CPUs, even with GPUs around


def test_tiny_models_stay_on_cpus_unless_their_entry_asks_for_a_gpu() -> None:
    placed, _ = place(tiny(), GPUS, TIMEOUT_S)
    assert (placed.runtime.device, placed.resources.num_gpus) == ("cpu", 0)
    placed, _ = place(tiny(resources={"num_gpus": 1}), GPUS, TIMEOUT_S)
    assert (placed.runtime.device, placed.resources.num_gpus) == ("cuda", 1)


def test_without_gpus_a_model_whose_default_job_overruns_job_timeout_is_refused() -> None:
    # SDXL's default job: 1024², 30 steps at ~12.7 TFLOP a step, on one 50 GFLOP/s CPU.
    sdxl = real("sdxl", "sdxl", defaults={"width": 1024, "height": 1024, "steps": 30})
    assert cpu_seconds(sdxl, 50.0) == pytest.approx(12.7e12 * 30 / 25e9)
    placed, reason = place(sdxl, SLOW_CPU, TIMEOUT_S)
    assert placed is sdxl and reason is not None
    assert reason.startswith("Model sdxl needs a GPU: its default job (1024x1024, 30 steps) "
                             "would take ~4.2 h on the 1 CPU(s) of its replica here")
    assert "over JOB_TIMEOUT (300 s)" in reason and "runtime.device: cpu" in reason


def test_without_gpus_a_model_that_fits_job_timeout_on_its_cpus_runs_there() -> None:
    turbo = real("sd-turbo", defaults={"width": 512, "height": 512, "steps": 1},
                 resources={"num_cpus": 4})
    assert cpu_seconds(turbo, 50.0) == pytest.approx(1.7e12 / 100e9)  # 17 s
    placed, reason = place(turbo, SLOW_CPU, TIMEOUT_S)
    assert reason is None and placed.runtime.device == "cpu"


def test_the_operators_explicit_cpu_choice_serves_a_slow_model_anyway() -> None:
    placed, reason = place(real(runtime={"device": "cpu"}), SLOW_CPU, TIMEOUT_S)
    assert reason is None and placed.runtime.device == "cpu"
    assert place(tiny(), SLOW_CPU, TIMEOUT_S)[1] is None


@pytest.mark.parametrize("fields", [{"runtime": {"device": "cuda"}},
                                    {"resources": {"num_gpus": 1}}])
def test_a_model_that_needs_a_gpu_on_a_cluster_without_one_is_refused(fields) -> None:
    _, reason = place(real(**fields), SLOW_CPU, TIMEOUT_S)
    assert reason is not None and "this cluster has none" in reason
    assert "IMAGEGEN_ACCELERATOR=cuda" in reason


def test_placing_keeps_every_entry_and_names_the_refused_ones() -> None:
    registry = parse_registry({"models": [real().model_dump(), tiny().model_dump()]})
    placed = place_all(registry, SLOW_CPU, TIMEOUT_S)
    assert [m.id for m in placed.models] == ["sd15", "tiny-sd"]
    assert list(placed.unavailable) == ["sd15"]


def test_a_registry_file_cannot_claim_what_placement_decides() -> None:
    with pytest.raises(ConfigError, match="unavailable: unknown key"):
        parse_registry({"models": [], "unavailable": {"x": "y"}})


# -- through the builder and the API -------------------------------------------------------


def weights(tmp_path: Path, name: str) -> str:
    """A folder that passes for a diffusers checkpoint on disk."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "x"}))
    return str(folder)


def app_args(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    models = [tiny().model_dump(exclude_defaults=True) | {"id": "tiny-sd"},
              {"id": "sdxl", "name": "SDXL", "description": "d", "pipeline": "sdxl",
               "path": weights(tmp_path, "sdxl"),
               "defaults": {"width": 1024, "height": 1024, "steps": 30}}]
    return {"models": {"models": models},
            "settings": {"data_dir": str(tmp_path / "data"), "default_model": "tiny-sd",
                         **settings}}


def model_actor_options(app: Any) -> dict[str, dict[str, Any]]:
    (tracker,) = app._bound_deployment.init_args[0]
    handles = tracker._bound_deployment.init_args[3]
    return {m: h._bound_deployment.ray_actor_options for m, h in handles.items()}


def test_on_a_cluster_with_a_gpu_the_real_models_replica_asks_ray_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_module, "_ray_gpus", lambda: 1.0)  # Ray sees a GPU node
    options = model_actor_options(build_app(app_args(tmp_path)))
    assert options["sdxl"]["num_gpus"] == 1.0 and options["tiny-sd"]["num_gpus"] == 0


def test_without_gpus_the_slow_model_is_not_deployed_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_module, "measure_cpu_gflops", lambda: 50.0)
    _, registry, served = resolve(builder_module.AppArgs.model_validate(
        app_args(tmp_path, accelerator="none")))
    assert [m.id for m in served] == ["tiny-sd"]
    assert registry.unavailable["sdxl"].startswith("Model sdxl needs a GPU")
    assert set(model_actor_options(build_app(app_args(tmp_path, accelerator="none")))) == {
        "tiny-sd"}


def test_a_default_model_that_cannot_run_here_stops_the_start_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder_module, "measure_cpu_gflops", lambda: 50.0)
    with pytest.raises(ConfigError, match="is not served: Model sdxl needs a GPU"):
        resolve(builder_module.AppArgs.model_validate(
            app_args(tmp_path, accelerator="none", default_model="sdxl")))


@pytest.mark.anyio
async def test_get_models_and_a_request_for_an_unplaced_model_give_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.trackers import http_client, make_tracker

    monkeypatch.setattr(builder_module, "measure_cpu_gflops", lambda: 50.0)
    settings, registry, served = resolve(builder_module.AppArgs.model_validate(
        app_args(tmp_path, accelerator="none", store="memory")))
    ids = frozenset(m.id for m in served)
    tracker = make_tracker(registry, settings, served=ids)
    async with http_client(tracker, settings, registry, ids) as client:
        models = {m["id"]: m for m in (await client.get("/models")).json()["models"]}
        resp = await client.post("/generate/text2img", json={"prompt": "x", "model": "sdxl"})
    await tracker.close()
    assert models["sdxl"]["served"] is False
    assert models["sdxl"]["unavailable"] == registry.unavailable["sdxl"]
    assert (models["tiny-sd"]["device"], models["tiny-sd"]["numGpus"]) == ("cpu", 0)
    assert resp.status_code == 400
    assert resp.json() == {"error": registry.unavailable["sdxl"]}
