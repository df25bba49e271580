"""End to end through real Ray Serve on loopback: the shipped tiny-sd entry's LoRAs and
ControlNet, and ENABLE_NSFW_FILTER with the tiny safety checker (on for the whole module:
an unflagged image passes the checker unchanged, so the LoRA identities hold as well).
Driven over HTTP as a client would: GET /models, POST, poll GET /jobs/:id, decode."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from serve_app.registry import load_registry
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


def shipped(*ids: str, **changes: dict[str, Any]) -> dict[str, Any]:
    """Entries as config/models.yaml ships them (the adapters included)."""
    registry = load_registry(ROOT / "config" / "models.yaml")
    return {"models": [registry.get(i).model_dump(exclude_none=True) | changes.get(i, {})
                       for i in ids]}


@pytest.fixture(scope="module")
def harness(local_ray) -> ServeHarness:  # type: ignore[no-untyped-def]
    """One deployment (a redeploy costs ~30 s here): the shipped tiny-sd with its adapters,
    and two seeded tiny models with a tiny safety checker, one of them lowered to flag
    everything, with ENABLE_NSFW_FILTER on."""
    served: ServeHarness = local_ray.harness().for_module("test_e2e_adapters")
    flagging_model(served)
    models = shipped("tiny-sd", "tiny-sd-inpaint")["models"]
    # The seeded tiny SD (it ships a tiny safety checker; the trained model has none).
    flagging = {k: v for k, v in models[0].items() if k != "path"} | {
        "id": "tiny-flagging", "source": "tiny", "inpainting_model": None, "loras": [],
        "control_nets": []}
    checked = flagging | {"id": "tiny-checked"}  # the same tiny checker, as built: no flags
    served.deploy({"models": [*models, flagging, checked]}, enable_nsfw_filter=True)
    return served


def flagging_model(harness: ServeHarness) -> None:
    """A tiny SD model whose checker flags every image: built ahead, thresholds lowered."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    from serve_app.generation.safety import set_concept_thresholds
    from serve_app.generation.tiny import ensure_tiny_model

    folder = ensure_tiny_model("tiny", harness.cache_dir / "tiny-flagging") / "safety_checker"
    checker = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True)
    set_concept_thresholds(checker, -1.0)
    checker.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def client(harness: ServeHarness) -> Iterator[httpx.Client]:
    with harness.client() as c:
        yield c


def run(client: httpx.Client, body: dict[str, Any]) -> list[bytes]:
    """Submit a text2img job and return its images once it completed."""
    job_id = submit(client, body)
    return images(wait_for(client, job_id))


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    resp = client.post("/generate/text2img", json=JOB | body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def images(job: dict[str, Any]) -> list[bytes]:
    assert job["status"] == "completed", job.get("error", job)
    return [base64.b64decode(uri.split(",", 1)[1]) for uri in job["result"]["images"]]


def size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def test_a_listed_lora_at_scale_0_is_the_base_image_and_at_1_another(
        client: httpx.Client) -> None:
    tiny = next(m for m in client.get("/models").json()["models"] if m["id"] == "tiny-sd")
    name = tiny["loras"][0]["name"]
    base = run(client, {"seed": 5})
    zero = run(client, {"seed": 5, "loras": [{"name": name, "scale": 0}]})
    one = run(client, {"seed": 5, "loras": [{"name": name, "scale": 1}]})
    assert zero == base and one != base
    assert run(client, {"seed": 5, "loras": [{"name": name, "scale": 1}]}) == one
    assert [size(img) for img in base + zero + one] == [(64, 64)] * 3


def test_jobs_with_loras_batched_together_make_the_images_they_make_alone(
        client: httpx.Client) -> None:
    loras = [{"name": "tiny-style", "scale": 0.8}, {"name": "tiny-detail", "scale": 0.4}]
    ids = [submit(client, {"seed": 40 + i, "loras": loras}) for i in range(4)]
    together = [images(wait_for(client, job_id)) for job_id in ids]
    alone = [run(client, {"seed": 40 + i, "loras": loras}) for i in range(4)]
    assert together == alone and len({img[0] for img in alone}) == 4


def test_an_unknown_lora_is_a_400_naming_it(client: httpx.Client) -> None:
    resp = client.post("/generate/text2img", json=JOB | {"loras": [{"name": "watercolor"}]})
    assert resp.status_code == 400
    assert "unknown LoRA 'watercolor'" in resp.json()["error"]
    assert "tiny-style" in resp.json()["error"]


def test_a_controlnet_job_with_canny_preprocessing_makes_the_requested_size(
        client: httpx.Client) -> None:
    disc = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(disc).ellipse((16, 16, 47, 47), fill="white")
    buffer = io.BytesIO()
    disc.save(buffer, "PNG")
    control = {"model": "tiny-canny", "image": base64.b64encode(buffer.getvalue()).decode(),
               "conditioningScale": 1.0, "preprocess": "canny"}
    steered = run(client, {"seed": 5, "width": 96, "controlNet": control})
    assert size(steered[0]) == (96, 64)
    assert steered != run(client, {"seed": 5, "width": 96})


def test_with_the_nsfw_filter_each_image_is_flagged_and_flagged_ones_are_black(
        client: httpx.Client) -> None:
    clean = wait_for(client, submit(client, {"seed": 5, "numImages": 2,
                                             "model": "tiny-checked"}))
    assert clean["result"]["nsfw"] == [False, False]
    # The trained model ships no checker: nothing was checked, and the result says so.
    unchecked = wait_for(client, submit(client, {"seed": 5}))
    assert "nsfw" not in unchecked["result"]
    flagged = wait_for(client, submit(client, {"seed": 5, "model": "tiny-flagging"}))
    assert flagged["result"]["nsfw"] == [True]
    with Image.open(io.BytesIO(images(flagged)[0])) as img:
        assert np.asarray(img).max() == 0
