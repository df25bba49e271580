"""The end-to-end tier: one local Ray + Serve for the whole session, started on first use."""

from __future__ import annotations

import os

import pytest

from tests.support.s3 import CREDENTIALS, S3Server

# Before Ray starts: its processes inherit the S3 client's credentials (any will do for the
# test server; a real deployment's come from its secrets or instance role).
for _name, _value in CREDENTIALS.items():
    os.environ.setdefault(_name, _value)

# Modules that stop the session's shared Ray to run one of another shape: last, so the
# shared Ray is not started a second time for the modules after them (~20 s).
OWN_RAY_MODULES = {"test_multinode", "test_e2e_restart"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def own_ray(item: pytest.Item) -> bool:
        return item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in (
            OWN_RAY_MODULES)

    items.sort(key=own_ray)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One local Ray + Serve for every e2e module of the session (started on first use)."""
    from tests.support.serve_harness import LocalRay

    ray_holder = LocalRay(tmp_path_factory.mktemp("e2e"))
    yield ray_holder
    ray_holder.stop()


@pytest.fixture(scope="module")
def serve_harness(local_ray, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The session's Ray + Serve with the default app deployed, and a job store of this
    module's own."""
    harness = local_ray.harness().for_module(request.module.__name__.rsplit(".", 1)[-1])
    harness.deploy()
    return harness


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real S3 server (SeaweedFS) on loopback for the session, started on first use."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        yield server
    finally:
        server.close()
