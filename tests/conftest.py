"""Fixtures every tier uses. The tiers: `tests/unit/` (in process, no Ray, no browser;
`make check`) and `tests/e2e/` (real Ray Serve, a browser, clusters); shared building
blocks live in `tests/support/`."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cli import local_ray_env
from serve_app.registry import Registry, load_registry
from serve_app.settings import Settings
from tests.support import ROOT
from tests.support.fakes import TEST_BLOBS

# Before any test module imports Ray: Ray reads its environment once, at import.
local_ray_env()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(ROOT / "config" / "models.yaml")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "models"),
                    model_path=str(tmp_path / "weights"), store="memory",
                    blob_url=TEST_BLOBS)
