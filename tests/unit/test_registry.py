from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import ConfigError
from serve_app.messages import SAMPLERS
from serve_app.registry import Registry, load_registry, parse_registry
from serve_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def entry(**over: Any) -> dict[str, Any]:
    return {"id": "m", "name": "M", "description": "d", "source": "tiny"} | over


def test_the_shipped_registry_parses_and_serves_only_what_is_present(
    registry: Registry, settings: Settings
) -> None:
    assert [m.id for m in registry.served(settings)] == [
        "tiny-sd", "tiny-sd-inpaint", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
    assert registry.get("sdxl") is not None and registry.get("sdxl").pipeline == "sdxl"


def test_real_weights_make_a_model_served(registry: Registry, settings: Settings) -> None:
    folder = Path(settings.model_path) / "sd-turbo"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert "sd-turbo" in [m.id for m in registry.served(settings)]


def test_a_misspelt_autoscaling_key_stops_the_start_naming_it() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_registry({"models": [entry(scaling={"min_replica": 0})]})
    assert "models[0] (m).scaling.min_replica: unknown key" in str(exc.value)


def test_bad_registry_values_are_reported() -> None:
    cases = [
        ({"models": [entry(), entry()]}, "duplicate model ids: m"),
        ({"models": [entry(inpainting_model="ghost")]}, "'ghost'"),
        ({"models": [entry(source="path")]}, "needs a 'path'"),
        ({"models": [entry(scaling={"min_replicas": 3, "max_replicas": 1})]}, "min_replicas"),
        ({"models": [entry(defaults={"sampler": "magic"})]}, "unknown sampler"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as exc:
            parse_registry(data)
        assert message in str(exc.value), data


def test_scaling_translates_to_serve_autoscaling_config() -> None:
    spec = parse_registry({"models": [entry(scaling={
        "min_replicas": 0, "max_replicas": 3, "idle_timeout_s": 45})]}).models[0]
    config = spec.scaling.autoscaling_config()
    assert config["min_replicas"] == 0 and config["initial_replicas"] == 0
    assert config["max_replicas"] == 3 and config["downscale_to_zero_delay_s"] == 45


def test_resources_translate_to_ray_actor_options() -> None:
    spec = parse_registry({"models": [entry(resources={"num_gpus": 0.5, "memory_gb": 2})]})
    assert spec.models[0].resources.ray_actor_options() == {
        "num_cpus": 1.0, "num_gpus": 0.5, "memory": 2 * 1024**3}


def test_unreadable_registry_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(bad)
    with pytest.raises(ConfigError, match="Cannot read"):
        load_registry(tmp_path / "missing.yaml")


def test_every_default_sampler_is_known(registry: Registry) -> None:
    assert all(m.defaults.sampler in SAMPLERS for m in registry.models)


def test_a_family_sets_the_default_sampler_and_refuses_the_others_naming_the_valid_ones(
    registry: Registry,
) -> None:
    flux = parse_registry({"models": [entry(id="f", source="tiny-flux")]}).models[0]
    assert (flux.pipeline, flux.defaults.sampler, flux.samplers) == ("flux", "euler", ("euler",))
    assert flux.sampler_error("euler") is None
    assert flux.sampler_error("dpm++_2m") == (
        "Sampler 'dpm++_2m' does not apply to model 'f' (a flux model); valid samplers: euler")
    assert flux.sampler_error("magic") == "Unknown sampler 'magic'; valid samplers: euler"
    sdxl = registry.get("tiny-sdxl")
    assert sdxl is not None and sdxl.samplers == SAMPLERS and sdxl.sampler_error("heun") is None


def test_family_mismatches_in_the_registry_stop_the_start() -> None:
    cases = [
        (entry(source="tiny-flux", defaults={"sampler": "euler_a"}), "does not apply"),
        (entry(source="tiny-flux", pipeline="sd"), "source 'tiny-flux' is a 'flux' model"),
        (entry(source="path", path="x", pipeline="sd3", defaults={"sampler": "ddim"}),
         "valid samplers: euler"),
        (entry(pipeline="kandinsky"), "models[0] (m).pipeline"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as exc:
            parse_registry({"models": [data]})
        assert message in str(exc.value), data
