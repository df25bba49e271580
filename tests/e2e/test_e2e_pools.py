"""End to end through real Ray Serve on loopback: model pools and LoRA folders.

One deployment (a redeploy costs ~30 s here) of:
- pool `shared`: 8 seeded tiny models on 2 replicas holding at most 3 each, with a LoRA
  folder;
- pool `probe`: 4 more seeded models on 1 replica holding 3, for the memory check (one
  replica, so every call's load and eviction happens in the process measured);
- `solo-<k>`: each of the 8 models again (same source, same seed, another id) with its own
  deployment from zero replicas, the reference images.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 11}
SEEDS = range(1, 9)
# 80 jobs with a Zipf-like popularity: model 1 gets 30, model 8 gets 3.
COUNTS = dict(zip([f"pm-{k}" for k in SEEDS], [30, 15, 10, 8, 6, 5, 3, 3], strict=True))
SWITCHES = 100  # probe calls, each of a model the replica does not hold (8 > 3: LRU misses)
# What a replica's RSS may grow by between its first 3 loads and the last switch: the
# tiny model's weights are ~5 MB, its pipeline objects a few more; a replica that kept
# every evicted model would grow by ~20 MB a switch.
RSS_BOUND_MB = 120


def tiny(model_id: str, seed: int, **over: Any) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "description": "seeded tiny variant",
            "source": "tiny", "seed": seed} | over


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pool-loras")


@pytest.fixture(scope="module")
def harness(local_ray, lora_dir: Path) -> ServeHarness:  # type: ignore[no-untyped-def]
    served: ServeHarness = local_ray.harness().for_module("test_e2e_pools")
    registry = {
        "pools": [
            {"id": "shared", "max_models_per_replica": 3, "lora_dirs": [str(lora_dir)],
             "scaling": {"min_replicas": 2, "max_replicas": 2, "max_batch_size": 4},
             "resources": {"num_cpus": 0.75}},
            {"id": "probe", "max_models_per_replica": 3,
             "scaling": {"min_replicas": 1, "max_replicas": 1},
             "resources": {"num_cpus": 0.5}},
        ],
        "models": [tiny(f"pm-{k}", k, pool="shared") for k in SEEDS]
        + [tiny(f"probe-{k}", 100 + k, pool="probe") for k in range(1, 5)]
        + [tiny(f"solo-{k}", k, scaling={"min_replicas": 0, "max_replicas": 1,
                                         "idle_timeout_s": 5},
                resources={"num_cpus": 0.1}) for k in SEEDS],
    }
    served.deploy(registry, default_model="pm-1", max_concurrent_jobs=8, max_queue_size=200)
    return served


@pytest.fixture(scope="module")
def client(harness: ServeHarness) -> Iterator[httpx.Client]:
    with harness.client() as c:
        yield c


def submit(client: httpx.Client, model: str, **body: Any) -> str:
    resp = client.post("/generate/text2img", json=JOB | {"model": model} | body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def image(job: dict[str, Any]) -> bytes:
    assert job["status"] == "completed", job
    return base64.b64decode(job["result"]["images"][0].split(",", 1)[1])


def finish_all(client: httpx.Client, ids: list[str], timeout_s: float = 600
               ) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: wait_for(client, i, timeout_s), ids))


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_eighty_skewed_jobs_over_a_pool_match_each_models_own_deployment(
        client: httpx.Client) -> None:
    order = [m for m, n in COUNTS.items() for _ in range(n)]
    order = order[::2] + order[1::2]  # popular and rare interleaved
    ids = [submit(client, model) for model in order]
    jobs = finish_all(client, ids)
    by_model: dict[str, set[bytes]] = {}
    for model, job in zip(order, jobs, strict=True):
        by_model.setdefault(model, set()).add(image(job))
    # Every job of a model made the same bytes, whichever replica and however often the
    # model was evicted and reloaded; the 8 models made 8 different images.
    assert all(len(images) == 1 for images in by_model.values()), {
        m: len(i) for m, i in by_model.items()}
    assert len({next(iter(i)) for i in by_model.values()}) == 8
    # Each equals its model's image from a deployment of its own (scaled from zero).
    solo_ids = {k: submit(client, f"solo-{k}") for k in SEEDS}
    for k, job_id in solo_ids.items():
        assert image(wait_for(client, job_id, 300)) == next(iter(by_model[f"pm-{k}"])), k

    text = client.get("/metrics").text
    loads = metric(text, "imagegen_pool_model_loads_total", pool="shared")
    hits = metric(text, "imagegen_pool_model_hits_total", pool="shared")
    assert loads >= 8 and hits > 0
    assert loads + hits == metric(text, "imagegen_batch_size_count", model="pm-1") + sum(
        metric(text, "imagegen_batch_size_count", model=f"pm-{k}") for k in range(2, 9))
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    held = [models[f"pm-{k}"]["loadedReplicas"] for k in SEEDS]
    assert sum(held) <= 2 * 3 and models["pm-1"]["pool"] == "shared"
    assert models["pm-1"]["maxModelsPerReplica"] == 3


def test_a_replicas_memory_stays_bounded_over_many_switches(
        client: httpx.Client) -> None:
    for k in (1, 2, 3):
        wait_for(client, submit(client, f"probe-{k}"))
    rss = probe_rss()
    first_three = rss()
    cycle = [f"probe-{k}" for k in (4, 1, 2, 3)]  # each one the replica evicted last
    for i in range(SWITCHES):
        job = wait_for(client, submit(client, cycle[i % 4]), 120)
        assert job["status"] == "completed", job
    after = rss()
    text = client.get("/metrics").text
    assert metric(text, "imagegen_pool_model_evictions_total", pool="probe") == SWITCHES
    assert metric(text, "imagegen_pool_model_loads_total", pool="probe") == SWITCHES + 3
    grew_mb = (after - first_three) / 2**20
    print(f"probe replica RSS: {first_three / 2**20:.0f} MB after 3 loads, "
          f"{after / 2**20:.0f} MB after {SWITCHES} switches ({grew_mb:+.0f} MB)")
    assert grew_mb < RSS_BOUND_MB


def probe_rss() -> Callable[[], int]:
    """The probe pool's one replica's RSS, as it measures itself (`PoolReplica.rss_bytes`)."""
    from ray import serve

    from tests.support.serve_harness import APP_NAME

    handle = serve.get_deployment_handle("pool-probe", app_name=APP_NAME)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)  # a synchronous driver
    return lambda: int(handle.rss_bytes.remote().result(timeout_s=60))


def test_a_lora_copied_into_the_folder_while_serving_is_usable(
        client: httpx.Client, lora_dir: Path, tmp_path: Path) -> None:
    from serve_app.generation.tiny import build_tiny_pipeline
    from serve_app.generation.tiny_adapters import write_tiny_lora

    resp = client.post("/generate/text2img", json=JOB | {"model": "pm-2", "loras": [
        {"name": "late-style", "scale": 0.8}]})
    assert resp.status_code == 400 and "late-style" in resp.json()["error"]
    write_tiny_lora(tmp_path, build_tiny_pipeline("tiny", tmp_path / "tok"), "unet", 5)
    staged = lora_dir / ".late-style.partial"
    shutil.copy(tmp_path / "pytorch_lora_weights.safetensors", staged)
    staged.rename(lora_dir / "late-style.safetensors")  # appears complete, at once
    began = time.monotonic()
    styled = image(wait_for(client, submit(client, "pm-2", loras=[
        {"name": "late-style", "scale": 0.8}])))
    print(f"LoRA usable {time.monotonic() - began:.1f} s after the copy (job included)")
    plain = image(wait_for(client, submit(client, "pm-2")))
    assert styled != plain
    listed = {m["id"]: m for m in client.get("/models").json()["models"]}["pm-2"]["loras"]
    assert {"name": "late-style", "format": "diffusers"}.items() <= listed[0].items()
    near = client.post("/generate/text2img", json=JOB | {"model": "pm-2", "loras": [
        {"name": "late-styel", "scale": 0.8}]})
    assert near.status_code == 400 and "did you mean late-style?" in near.json()["error"]


def test_the_compatible_apis_list_and_switch_pool_models(client: httpx.Client) -> None:
    names = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert {f"pm-{k}" for k in SEEDS} <= set(names)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "pm-3"}
                       ).status_code == 200
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": JOB["prompt"], "width": 64,
                                                    "height": 64, "steps": 2, "seed": 11})
    assert a1111.status_code == 200, a1111.text
    assert json.loads(a1111.json()["info"])["sd_model_name"] == "pm-3"
    openai = client.post("/v1/images/generations", json={
        "model": "pm-4", "prompt": JOB["prompt"], "size": "64x64", "steps": 2, "seed": 11,
        "response_format": "b64_json"})
    assert openai.status_code == 200, openai.text
    native = image(wait_for(client, submit(client, "pm-4")))
    assert base64.b64decode(openai.json()["data"][0]["b64_json"]) == native
