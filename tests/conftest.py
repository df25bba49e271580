from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cli import local_ray_env
from serve_app.registry import Registry, load_registry
from serve_app.settings import Settings

# Before any test module imports Ray: Ray reads its environment once, at import.
local_ray_env()

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(ROOT / "config" / "models.yaml")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "models"),
                    model_path=str(tmp_path / "weights"), store="memory")


@pytest.fixture(scope="module")
def serve_harness(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A local Ray + Serve per test module (modules may need differently shaped clusters),
    with the default app deployed."""
    from tests import serve_harness as harness_module

    gen = harness_module.start(tmp_path_factory.mktemp("e2e"))
    harness = next(gen)
    harness.deploy()
    yield harness
    gen.close()
