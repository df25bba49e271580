"""End to end through real Ray Serve on loopback, for the modes that take input images
(img2img, inpainting, style transfer), text2img's hires fix (two passes, one job), several
images per job, JPEG/WebP output, and bad
input images never disturbing other jobs (the table of bad images itself runs in process,
tests/unit/test_http.py). Driven over HTTP exactly as a client following the seed document
would: POST a job, poll GET /jobs/:id, decode the data URIs (or fetch /jobs/:id/images/:n)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.support.images import (
    BAD_INPUTS,
    INPAINT_BOX,
    bare_b64,
    data_uri,
    data_uri_of,
    encode,
    gradient,
    img2img,
    inpaint,
    pixels,
    stripes,
    style,
)
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e



@pytest.fixture
def client(serve_harness: ServeHarness) -> Iterator[httpx.Client]:
    with serve_harness.client() as c:
        yield c


# -- the API as a client uses it ---------------------------------------------------------


def submit(client: httpx.Client, mode: str, **body: Any) -> dict[str, Any]:
    resp = client.post(f"/generate/{mode}", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (job["status"], job["type"]) == ("queued", mode)
    return job


def completed(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    done = wait_for(client, job["id"])
    assert done["status"] == "completed", done.get("error", done)
    assert done["progress"] == 100
    return done


def run(client: httpx.Client, mode: str, **body: Any) -> dict[str, Any]:
    return completed(client, submit(client, mode, **body))


def image_bytes(job: dict[str, Any], index: int = 0, mime: str = "image/png") -> bytes:
    uri = job["result"]["images"][index]
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix):])


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module", autouse=True)
def inpaint_submitted(serve_harness: ServeHarness) -> dict[str, Any]:
    """One inpainting job for the default (base) model, submitted as the module starts: its
    inpainting model starts from zero replicas, and that cold start (tens of seconds on
    two cores) then overlaps the other tests instead of adding to them."""
    with serve_harness.client() as c:
        return submit(c, "inpaint", **inpaint())


@pytest.fixture(scope="module")
def inpainted(
    serve_harness: ServeHarness, inpaint_submitted: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    with serve_harness.client() as c:
        return inpaint_submitted, completed(c, inpaint_submitted)


# -- text2img's hires fix -------------------------------------------------------------------


def test_a_hires_job_makes_twice_the_size_and_names_its_second_pass(client) -> None:
    body = {"prompt": "a lighthouse", "width": 192, "height": 128, "steps": 16, "seed": 5,
            "hires": {"scale": 2, "steps": 24, "denoisingStrength": 0.5}}
    job = submit(client, "text2img", **body)
    seen: list[tuple[str | None, int]] = []
    with connect_sse(client, "GET", f"/jobs/{job['id']}/events") as source:
        for event in source.iter_sse():
            if event.event != "job" or not event.data:
                continue  # not a record (sse-starlette's ping)
            record = json.loads(event.data)
            seen.append((record.get("phase"), record["progress"]))
            if record["status"] in ("completed", "failed", "cancelled"):
                break
    done = completed(client, job)
    assert opened(image_bytes(done)).size == (384, 256)
    assert done["request"]["hires"] == {"scale": 2, "width": 384, "height": 256,
                                        "upscaler": "latent", "steps": 24,
                                        "denoisingStrength": 0.5, "sampler": "ddim"}
    phases = [phase for phase, _ in seen if phase in ("generating", "hires")]
    # The second pass (12 steps at 384x256) shows as its own phase, after the first's.
    assert "hires" in phases and phases == sorted(phases, key=("generating", "hires").index)
    progress = [p for _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 100
    again = run(client, "text2img", **body)
    assert image_bytes(again) == image_bytes(done)  # the same seed, the same image


# -- img2img -------------------------------------------------------------------------------


def test_img2img_with_a_data_uri_or_bare_base64_gives_a_png_of_the_requested_size(
    client,
) -> None:
    source = gradient(80, 56)
    as_uri = run(client, "img2img", **img2img(initImage=data_uri(source), width=96, height=64))
    as_bare = run(client, "img2img",
                  **img2img(initImage=bare_b64(encode(source)), width=96, height=64))
    for done in (as_uri, as_bare):
        image = opened(image_bytes(done))
        assert (image.format, image.size) == ("PNG", (96, 64))
        params = done["result"]["parameters"]
        assert (params["strength"], params["width"], params["height"]) == (0.6, 96, 64)
        assert params["model"] == "tiny-sd"
    # The same picture, however it was encoded, is the same job: identical output.
    assert image_bytes(as_uri) == image_bytes(as_bare)


def test_img2img_without_a_size_keeps_the_input_size_rounded_down_to_multiples_of_8(
    client,
) -> None:
    job = submit(client, "img2img", **img2img(initImage=data_uri(gradient(100, 76))))
    assert (job["request"]["width"], job["request"]["height"]) == (96, 72)
    image = opened(image_bytes(completed(client, job)))
    assert image.size == (96, 72)


def test_a_job_record_describes_input_images_instead_of_echoing_their_base64(
    client, inpaint_submitted,
) -> None:
    payload = bare_b64(encode(gradient(72, 64)))
    job = submit(client, "img2img", **img2img(initImage=data_uri_of(base64.b64decode(payload))))
    done = completed(client, job)
    for record in (job, done, client.get(f"/jobs/{job['id']}").json()):
        described = record["request"]["initImage"]
        assert set(described) == {"width", "height", "bytes"}
        assert (described["width"], described["height"]) == (72, 64)
        assert described["bytes"] > 0
        assert payload[:64] not in json.dumps(record["request"])
    # No summary in the job list carries it either.
    listed = client.get("/jobs", params={"type": "img2img", "limit": 500}).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]
    assert payload[:64] not in json.dumps(listed)
    # Inpainting: both the image and the mask.
    echoed = inpaint_submitted["request"]
    for field in ("image", "mask"):
        assert set(echoed[field]) == {"width", "height", "bytes"}
        assert (echoed[field]["width"], echoed[field]["height"]) == (64, 64)
    assert "base64" not in json.dumps(echoed)


# -- style transfer ------------------------------------------------------------------------


def test_style_transfer_depends_on_the_style_image_and_is_reproducible(client) -> None:
    navy = style(styleImage=data_uri(stripes(64, 64, ("navy", "orange"))))
    green = style(styleImage=data_uri(stripes(64, 64, ("white", "darkgreen"), period=4)))
    jobs = [submit(client, "style-transfer", **body) for body in (navy, navy, green)]
    first, again, other = (image_bytes(completed(client, j)) for j in jobs)
    assert first == again
    assert first != other
    assert opened(first).size == (64, 64)


def test_style_strength_zero_gives_back_the_content_image(client) -> None:
    content = np.asarray(gradient(64, 64), dtype=np.int16)
    untouched = run(client, "style-transfer", **style(styleStrength=0))
    styled = run(client, "style-transfer", **style(styleStrength=0.9, contentStrength=0))
    untouched_diff = np.abs(pixels(image_bytes(untouched)) - content).mean()
    styled_diff = np.abs(pixels(image_bytes(styled)) - content).mean()
    assert untouched_diff < 2.0, untouched_diff
    # "small" is relative: a styled result of the same content is far from it.
    assert styled_diff > 10 * max(untouched_diff, 1.0), (untouched_diff, styled_diff)


# -- several images, output formats --------------------------------------------------------


def test_num_images_uses_consecutive_seeds_each_reproducible_alone(client) -> None:
    common = {"prompt": "three lighthouses", "width": 64, "height": 64, "steps": 3}
    batch = run(client, "text2img", **common, numImages=3, seed=100)
    alone = run(client, "text2img", **common, numImages=1, seed=101)
    assert batch["result"]["seeds"] == [100, 101, 102]
    assert batch["result"]["seed"] == 100
    assert len(batch["result"]["images"]) == 3
    made = [image_bytes(batch, i) for i in range(3)]
    assert len(set(made)) == 3
    assert made[1] == image_bytes(alone)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_output_formats_are_encoded_and_served_with_their_content_type(
    client, fmt: str,
) -> None:
    done = run(client, "text2img", prompt="a harbour", width=64, height=64, steps=2, seed=8,
               outputFormat=fmt, quality=80)
    data = image_bytes(done, mime=f"image/{fmt}")
    assert opened(data).format == fmt.upper()
    raw = client.get(f"/jobs/{done['id']}/images/0")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == f"image/{fmt}"
    assert raw.content == data


def test_bad_input_images_never_disturb_other_jobs(client) -> None:
    before = client.get("/queue/status").json()
    running = submit(client, "img2img", **img2img(width=128, height=128, steps=8))
    for mode, _, _, body in BAD_INPUTS.values():
        assert client.post(f"/generate/{mode}", json=body()).status_code == 400
    after_bad = submit(client, "img2img", **img2img())
    assert opened(image_bytes(completed(client, running))).size == (128, 128)
    assert opened(image_bytes(completed(client, after_bad))).size == (64, 64)
    after = client.get("/queue/status").json()
    # Rejected requests never became jobs: exactly the two good ones were added.
    assert total_jobs(after) == total_jobs(before) + 2
    assert after["failedJobs"] == before["failedJobs"]


def total_jobs(stats: dict[str, int]) -> int:
    return sum(stats[k] for k in ("queuedJobs", "processingJobs", "completedJobs",
                                  "failedJobs", "cancelledJobs"))


# -- inpainting (last: its model scales from zero) ---------------------------------------


def test_inpainting_keeps_pixels_outside_the_mask_and_repaints_inside(inpainted) -> None:
    _, done = inpainted
    out = pixels(image_bytes(done))
    source = np.asarray(gradient(64, 64), dtype=np.int16)
    assert out.shape == source.shape == (64, 64, 3)
    inside = np.zeros((64, 64), dtype=bool)
    left, top, right, bottom = INPAINT_BOX
    inside[top:bottom, left:right] = True
    assert np.array_equal(out[~inside], source[~inside])
    changed = np.any(out[inside] != source[inside], axis=-1)
    assert changed.mean() > 0.9, f"only {changed.mean():.0%} of the masked pixels changed"


def test_an_inpainting_job_for_the_base_model_runs_on_its_registry_inpainting_model(
    inpainted, client,
) -> None:
    # config/models.yaml: tiny-sd names tiny-sd-inpaint (9-channel UNet) as its
    # inpainting_model, which scales from zero replicas.
    job, done = inpainted
    # The request echoes what was asked for; the record and result say what ran it.
    assert job["request"]["model"] == "tiny-sd"
    assert (job["model"], job["phase"]) == ("tiny-sd-inpaint", "loading_model")  # cold start
    assert done["model"] == "tiny-sd-inpaint"
    assert done["result"]["parameters"]["model"] == "tiny-sd-inpaint"
    assert done["result"]["parameters"]["replica"].startswith("tiny-sd-inpaint#")
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    assert models["tiny-sd-inpaint"]["minReplicas"] == 0
    assert models["tiny-sd-inpaint"]["replicas"] == 1  # scaled up from zero for the job
