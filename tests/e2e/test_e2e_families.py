"""End to end through real Ray Serve on loopback: the shipped tiny SDXL and tiny FLUX entries
(min_replicas 0) serve text2img, img2img and inpainting (SDXL) and text2img and img2img
(FLUX) at the requested size, and a FLUX job with an SD-only sampler is a 400 naming the
valid ones. Driven over HTTP as a client would: POST, poll GET /jobs/:id, decode."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.registry import load_registry
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("tiny-sdxl", "tiny-flux")
SIZE = 64
STEPS = 2
BOX = (16, 16, 48, 48)  # the inpainting mask's white (repaint) rectangle, right/bottom exclusive


def shipped_entries() -> dict[str, Any]:
    """The two entries exactly as config/models.yaml ships them (min_replicas 0)."""
    registry = load_registry(ROOT / "config" / "models.yaml")
    return {"models": [registry.get(m).model_dump(exclude_none=True) for m in MODELS]}


@pytest.fixture(scope="module")
def harness(serve_harness: ServeHarness) -> ServeHarness:
    serve_harness.deploy(shipped_entries(), default_model="tiny-sdxl")
    return serve_harness


@pytest.fixture(scope="module")
def client(harness: ServeHarness) -> Iterator[httpx.Client]:
    with harness.client() as c:
        yield c


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def gradient() -> Image.Image:
    x = np.linspace(0, 255, SIZE, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 128.0 + 0 * x[None, :]), -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def mask() -> Image.Image:
    m = Image.new("L", (SIZE, SIZE), 0)
    m.paste(255, BOX)
    return m


JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "sdxl-text2img": ("text2img", {"model": "tiny-sdxl"}),
    "sdxl-img2img": ("img2img", {"model": "tiny-sdxl", "strength": 0.7}),
    "sdxl-inpaint": ("inpaint", {"model": "tiny-sdxl"}),
    "flux-text2img": ("text2img", {"model": "tiny-flux", "numImages": 2}),
    "flux-img2img": ("img2img", {"model": "tiny-flux", "strength": 0.7}),
}


@pytest.fixture(scope="module")
def finished(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every job submitted at once, so the two models' cold starts overlap."""
    inputs = {"img2img": {"initImage": png_uri(gradient())},
              "inpaint": {"image": png_uri(gradient()), "mask": png_uri(mask())}}
    ids = {}
    for name, (mode, body) in JOBS.items():
        payload = {"prompt": "a lighthouse at dusk", "width": SIZE, "height": SIZE,
                   "steps": STEPS, "seed": 7} | inputs.get(mode, {}) | body
        resp = client.post(f"/generate/{mode}", json=payload)
        assert resp.status_code == 202, resp.text
        ids[name] = resp.json()["id"]
    return {name: wait_for(client, job_id, timeout_s=180) for name, job_id in ids.items()}


def decoded(job: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for uri in job["result"]["images"]:
        data = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
        with Image.open(io.BytesIO(data)) as img:
            out.append(np.asarray(img.convert("RGB"), dtype=np.int16))
    return out


@pytest.mark.parametrize("name", list(JOBS))
def test_each_family_completes_its_modes_at_the_requested_size(
    finished: dict[str, dict[str, Any]], name: str,
) -> None:
    job = finished[name]
    assert job["status"] == "completed", job.get("error", job)
    model = JOBS[name][1]["model"]
    assert job["result"]["parameters"]["model"] == model
    assert job["result"]["parameters"]["replica"].startswith(f"{model}#")
    images = decoded(job)
    assert [image.shape for image in images] == [(SIZE, SIZE, 3)] * len(job["result"]["seeds"])


def test_sdxl_inpainting_repaints_only_inside_the_mask(
    finished: dict[str, dict[str, Any]],
) -> None:
    (out,) = decoded(finished["sdxl-inpaint"])
    source = np.asarray(gradient(), dtype=np.int16)
    inside = np.asarray(mask()) == 255
    assert np.array_equal(out[~inside], source[~inside])
    assert np.any(out[inside] != source[inside], axis=-1).mean() > 0.9


def test_both_models_are_listed_served_and_scaled_up_from_zero(
    finished: dict[str, dict[str, Any]], client: httpx.Client,
) -> None:
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    for model in MODELS:
        assert models[model]["served"] and models[model]["minReplicas"] == 0
        assert models[model]["replicas"] == 1
    flux_images = decoded(finished["flux-text2img"])
    assert not np.array_equal(*flux_images)  # seeds 7 and 8


def test_a_flux_job_with_an_sd_only_sampler_is_a_400_naming_the_valid_samplers(
    client: httpx.Client,
) -> None:
    resp = client.post("/generate/text2img", json={"prompt": "a boat", "model": "tiny-flux",
                                                   "sampler": "dpm++_2m_karras"})
    assert resp.status_code == 400
    assert resp.json() == {"error": "Sampler 'dpm++_2m_karras' does not apply to model "
                                    "'tiny-flux' (a flux model); valid samplers: euler"}
