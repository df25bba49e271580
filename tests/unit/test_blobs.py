"""The blob store (serve_app/blobs.py): one contract over a folder and memory here; the same
contract against a real S3 server runs in tests/e2e/test_e2e_blobs.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.blobs import Blobs, input_key, job_of, open_blobs, output_key
from serve_app.errors import BlobNotFound, ConfigError
from serve_app.settings import Settings
from tests.support.blob_contract import check_contract


@pytest.fixture(params=["memory", "file"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Blobs]:
    if request.param == "memory":
        # Not the shared test store: a store of this test's own.
        from obstore.store import MemoryStore

        yield Blobs(MemoryStore())
    else:
        yield open_blobs(Settings(data_dir=str(tmp_path / "data")))


def test_every_store_keeps_the_contract(blobs: Blobs) -> None:
    check_contract(blobs)


def test_keys_are_job_scoped_and_name_their_job() -> None:
    assert input_key("job_1_a", "init_image") == "jobs/job_1_a/in/init_image.png"
    assert output_key("job_1_a", 2, "webp") == "jobs/job_1_a/out/2.webp"
    assert job_of("jobs/job_1_a/out/2.webp") == "job_1_a"
    assert job_of("elsewhere/x.png") is None and job_of("jobs/x") is None


def test_a_stored_output_is_referenced_by_key_size_and_digest(blobs: Blobs) -> None:
    data = os.urandom(1000)
    ref = asyncio.run(blobs.store_output("job_9_z", 1, data, "image/jpeg", 64, 48))
    assert (ref.key, ref.content_type, ref.size, ref.width, ref.height) == (
        "jobs/job_9_z/out/1.jpg", "image/jpeg", 1000, 64, 48)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert blobs.get(ref.key) == data


def test_the_default_is_a_folder_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))
    assert settings.blobs == (tmp_path / "data" / "blobs").as_uri()
    open_blobs(settings).put("jobs/j/out/0.png", b"x", "image/png")
    assert (tmp_path / "data" / "blobs" / "jobs" / "j" / "out" / "0.png").read_bytes() == b"x"


@pytest.mark.parametrize(("url", "says"), [
    ("file://relative/path", "absolute path"),
    ("s3://", "name the bucket"),
    ("gs://bucket/x", "use file:///absolute/path, s3://bucket/prefix or memory://"),
    ("ftp://host/x", "use file:///absolute/path"),
])
def test_a_blob_url_that_cannot_work_stops_the_start_naming_it(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        open_blobs(Settings(blob_url=url))


def test_only_an_s3_store_signs_urls(blobs: Blobs) -> None:
    assert blobs.signs is False
    with pytest.raises(ValueError, match="no presigned URLs"):
        blobs.presigned("jobs/j/out/0.png", 60)


def test_an_s3_store_signs_urls_offline_with_the_standard_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Signing is local (no request): a URL for the key, valid for the time asked."""
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
                        "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    blobs = open_blobs(Settings(blob_url=f"s3://bucket-{time.time_ns()}/imagegen",
                                s3_endpoint_url="http://127.0.0.1:1"))
    url = blobs.presigned("jobs/j/out/0.png", 120)
    assert "/imagegen/jobs/j/out/0.png?" in url and "X-Amz-Expires=120" in url
    assert "X-Amz-Credential=AKIDEXAMPLE" in url and "X-Amz-Signature=" in url


def test_a_missing_blob_is_not_found(blobs: Blobs) -> None:
    with pytest.raises(BlobNotFound):
        blobs.get("jobs/nope/out/0.png")


def test_the_app_refuses_a_blob_store_its_processes_cannot_share(tmp_path: Path) -> None:
    from serve_app.builder import AppArgs, resolve

    with pytest.raises(ConfigError, match="memory:// lives in one process"):
        resolve(AppArgs(settings={"blob_url": "memory://", "data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="absolute path"):
        resolve(AppArgs(settings={"blob_url": "file://blobs", "data_dir": str(tmp_path)}))
