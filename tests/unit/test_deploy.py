"""`imagegen deploy`: the registry goes inline into the serve config, so what Serve
compares on `serve deploy` changes exactly when the registry does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import AppArgs, resolve
from serve_app.deploy import inline_registries
from serve_app.errors import ConfigError
from tests.support import ROOT


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "serve.yaml").read_text())


def test_the_registry_is_inlined_and_the_app_still_builds(tmp_path: Path) -> None:
    config = inline_registries(serve_config(), ROOT)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` sends
    args = config["applications"][0]["args"]
    assert isinstance(args["models"], dict)
    ids = [m["id"] for m in args["models"]["models"]]
    assert ids[:2] == ["tiny-sd", "tiny-sd-inpaint"]
    settings = {"cache_dir": str(tmp_path), "data_dir": str(tmp_path)}
    _, registry, served = resolve(AppArgs(models=args["models"], settings=settings))
    assert registry.get("tiny-sd") is not None and served


def test_a_changed_registry_changes_what_serve_compares(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    registry = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    (tmp_path / "config" / "models.yaml").write_text(yaml.safe_dump(registry))
    before = inline_registries(serve_config(), tmp_path)
    assert inline_registries(serve_config(), tmp_path) == before  # unchanged: a no-op
    changed = copy.deepcopy(registry)
    changed["models"][0]["scaling"]["max_batch_size"] = 2
    (tmp_path / "config" / "models.yaml").write_text(yaml.safe_dump(changed))
    after = inline_registries(serve_config(), tmp_path)
    assert after["applications"][0]["args"] != before["applications"][0]["args"]


def test_a_broken_registry_stops_the_deploy_here(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "models.yaml").write_text("models: [{id: x, colour: red}]")
    with pytest.raises(ConfigError, match="unknown key"):
        inline_registries(serve_config(), tmp_path)
