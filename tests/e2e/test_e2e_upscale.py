"""End to end through real Ray Serve on loopback: upscale jobs (the tiny ESRGAN, tiled, and
Lanczos) make the requested size, progress to 100 and land in the blob store like other
images; outpainting 64 px on each side makes the padded size with the original pixels
unchanged outside the seam, on the tiny inpainting model; A1111's extras answer
synchronously. Driven over HTTP as a client would."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.images import data_uri, pixels
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(serve_harness: ServeHarness) -> Iterator[httpx.Client]:
    with serve_harness.client() as c:
        yield c


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def run(client: httpx.Client, mode: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(f"/generate/{mode}", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (job["status"], job["type"]) == ("queued", mode)
    done = wait_for(client, job["id"])
    assert done["status"] == "completed", done.get("error", done)
    assert done["progress"] == 100
    return done


def first_image(job: dict[str, Any]) -> bytes:
    uri = job["result"]["images"][0]
    assert uri.startswith("data:image/png;base64,")
    return base64.b64decode(uri.split(",", 1)[1])


@pytest.mark.parametrize(("upscaler", "body", "size"), [
    ("tiny-esrgan", {"scale": 2}, (192, 160)),
    ("tiny-esrgan", {"width": 400}, (400, 333)),
    ("lanczos", {"scale": 3}, (288, 240)),
])
def test_upscale_jobs_make_the_requested_size(client: httpx.Client, upscaler: str,
                                              body: dict[str, Any],
                                              size: tuple[int, int]) -> None:
    source = noise(96, 80)
    done = run(client, "upscale", {"image": data_uri(source), "upscaler": upscaler, **body})
    data = first_image(done)
    assert Image.open(io.BytesIO(data)).size == size
    assert (done["request"]["width"], done["request"]["height"]) == size
    # Stored like any result: the image route serves the same bytes.
    served = client.get(f"/jobs/{done['id']}/images/0")
    assert served.status_code == 200 and served.content == data
    if upscaler == "lanczos":
        expected = np.asarray(source.resize(size, Image.Resampling.LANCZOS), np.int16)
        assert np.array_equal(pixels(data), expected)


def test_outpaint_64_each_side_keeps_the_original_outside_the_seam(
        client: httpx.Client) -> None:
    source = noise(96, 80, seed=5)
    done = run(client, "outpaint", {
        "prompt": "more of the same", "image": data_uri(source), "left": 64, "right": 64,
        "top": 64, "bottom": 64, "seam": 8, "steps": 3, "seed": 11})
    assert done["model"] == "tiny-sd-inpaint"
    out = pixels(first_image(done))
    assert out.shape == (80 + 128, 96 + 128, 3)
    inner = out[64 + 8:64 + 80 - 8, 64 + 8:64 + 96 - 8]
    assert np.array_equal(inner, np.asarray(source, np.int16)[8:-8, 8:-8])
    assert out[:64].std() > 0  # the new area was painted


def test_a1111_extras_single_image_upscales_synchronously(client: httpx.Client) -> None:
    listed = client.get("/sdapi/v1/upscalers").json()
    names = [u["name"] for u in listed]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "tiny-esrgan" in names
    buf = io.BytesIO()
    noise(40, 32).save(buf, "PNG")
    resp = client.post("/sdapi/v1/extra-single-image", json={
        "image": base64.b64encode(buf.getvalue()).decode(), "upscaler_1": "tiny-esrgan",
        "upscaling_resize": 2})
    assert resp.status_code == 200, resp.text
    image = Image.open(io.BytesIO(base64.b64decode(resp.json()["image"])))
    assert image.size == (80, 64)
