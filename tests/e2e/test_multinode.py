"""Multi-node placement through real Ray Serve: a three-node `ray.cluster_utils.Cluster` on
loopback (a head without GPUs, two workers declaring one logical GPU each), the app on it,
two models that each claim a GPU. Replicas run on the CPU: the GPUs are only bookkeeping
for Ray's scheduler, which is exactly what placement is decided on. Last, the app with two
tracker shards (one per model) on a shared Redis, and one shard's actor killed."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from serve_app.cli import LOCAL_RAY_ENV
from serve_app.stores.redis import RedisStore
from tests.support.chaos import all_terminal, kill_replica, replaced, submit
from tests.support.images import img2img, inpaint, style
from tests.support.s3 import S3Server
from tests.support.serve_harness import APP_NAME, ServeHarness, free_port, wait_for
from tests.support.stores import REDIS_URL, redis_store

if TYPE_CHECKING:
    from ray.util.state.common import ActorState

pytestmark = pytest.mark.e2e

MODELS = ("tiny-a", "tiny-b")
NODE_STORE_BYTES = 128 * 1024 * 1024
# Serve places replicas with Ray's SPREAD strategy by default, which puts two
# half-GPU replicas on two GPU nodes while they have room. Packing small models onto
# one GPU (as `num_gpus: 0.5` in config/models.gpu.yaml intends) takes Serve's pack
# scheduler, switched on by this variable in the Serve controller's environment.
PACK_ENV = {"RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY": "1"}


def registry(num_gpus: float) -> dict[str, Any]:
    return {"models": [
        {"id": m, "name": m, "description": "tiny test model", "source": "tiny",
         "defaults": {"width": 64, "height": 64, "steps": 2},
         "scaling": {"min_replicas": 1, "max_replicas": 1},
         "resources": {"num_gpus": num_gpus, "num_cpus": 0.5},
         # The nodes' GPUs are Ray resources only: the replicas run on their CPUs.
         "runtime": {"device": "cpu"}}
        for m in MODELS
    ]}


@pytest.fixture(scope="module")
def cluster_app(tmp_path_factory: pytest.TempPathFactory,
                local_ray: Any) -> Iterator[ServeHarness]:
    local_ray.stop()  # this module runs a Ray cluster of its own
    with pytest.MonkeyPatch.context() as env:
        # Every node and the processes it starts inherit this environment: loopback only,
        # no usage stats, no token auth (as `imagegen serve` runs Ray), the pack scheduler.
        for key, value in (LOCAL_RAY_ENV | PACK_ENV).items():
            env.setenv(key, value)
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import, and another module
        # of the session may have imported it already; without this, `ray.init` rewrites
        # the head's 127.0.0.1 address to the machine's other address and cannot connect.
        from ray._private import ray_constants

        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        yield from _serve_on_a_cluster(tmp_path_factory.mktemp("multinode"))


def _serve_on_a_cluster(tmp: Path) -> Iterator[ServeHarness]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "object_store_memory": NODE_STORE_BYTES}
    # The state API (ray.util.state) is served by the dashboard: the head runs one.
    cluster = Cluster(initialize_head=True, head_node_args=node | {
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": None,
    })
    try:
        for _ in range(2):
            cluster.add_node(**node, num_cpus=2, num_gpus=1)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
        port = free_port()
        # One proxy: every node of this cluster shares the machine, so one port.
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": False})
        yield ServeHarness(f"http://127.0.0.1:{port}", tmp / "models", tmp / "data")
    finally:
        # serve.shutdown() without a connected Ray would start a fresh local one.
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def whole_gpu_app(cluster_app: ServeHarness) -> ServeHarness:
    cluster_app.deploy(registry(num_gpus=1), default_model=MODELS[0])
    return cluster_app


@pytest.fixture
def client(whole_gpu_app: ServeHarness) -> Iterator[httpx.Client]:
    with whole_gpu_app.client() as c:
        yield c


def replica_actors(model_id: str) -> list[ActorState]:
    """The live replica actors of a model's deployment (each knows its node)."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP_NAME}#model-{model_id}#"
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [a for a in actors if (a.name or "").startswith(prefix)]


def node_of_each_model(timeout_s: float = 60) -> dict[str, str]:
    """Node id of each model's replica, once each model has exactly one (a redeploy's
    old replicas may still be stopping)."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors = {m: replica_actors(m) for m in MODELS}
        if all(len(a) == 1 for a in actors.values()):
            return {m: a[0].node_id for m, a in actors.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"expected one replica per model: {actors}")
        time.sleep(0.5)


def gpu_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def wait_for_free_gpus(expected: float, timeout_s: float = 30) -> None:
    """Ray's resource view trails actor starts and stops by a moment: poll it."""
    import ray

    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get("GPU", 0.0)) != pytest.approx(expected):
        if time.monotonic() > deadline:
            raise AssertionError(f"{free} GPU(s) free, expected {expected}")
        time.sleep(0.25)


def test_two_whole_gpu_models_run_on_different_gpu_nodes(client) -> None:
    nodes = node_of_each_model()
    assert nodes["tiny-a"] != nodes["tiny-b"], nodes
    assert set(nodes.values()) == gpu_nodes()
    wait_for_free_gpus(0)  # each replica holds a whole GPU
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    assert all(models[m]["loaded"] and models[m]["replicas"] == 1 for m in MODELS), models


def test_jobs_route_to_the_replica_of_the_model_they_name(client) -> None:
    jobs = {m: client.post("/generate/text2img", json={"prompt": "x", "model": m, "seed": 7})
            for m in MODELS}
    assert all(r.status_code == 202 for r in jobs.values()), {m: r.text for m, r in jobs.items()}
    for model, resp in jobs.items():
        done = wait_for(client, resp.json()["id"])
        assert done["status"] == "completed", done
        params = done["result"]["parameters"]
        assert params["model"] == model
        # `<model>#<replica id>`: the id is the tail of the replica actor's name.
        replica_model, _, replica_id = params["replica"].partition("#")
        [actor] = replica_actors(model)
        assert replica_model == model and actor.name.endswith(f"#{replica_id}"), (
            params, actor.name)


# Last in the module: it leaves the app redeployed with half GPUs.
def test_half_gpu_models_pack_onto_one_gpu_node(whole_gpu_app: ServeHarness) -> None:
    whole_gpu_app.deploy(registry(num_gpus=0.5), default_model=MODELS[0])
    nodes = node_of_each_model()
    assert nodes["tiny-a"] == nodes["tiny-b"], nodes
    assert nodes["tiny-a"] in gpu_nodes()
    wait_for_free_gpus(1)  # the other GPU node's, whole


POOLED = [f"pooled-{k}" for k in range(1, 5)]


def pool_registry() -> dict[str, Any]:
    """A pool of 4 seeded tiny models on 2 replicas that each claim a whole GPU (so one per
    GPU node) and hold at most 2 models, and `solo-1`, pooled-1's checkpoint (same source,
    same seed) in a deployment of its own, on the head's CPUs."""
    tiny = {"description": "seeded tiny variant", "source": "tiny",
            "defaults": {"width": 64, "height": 64, "steps": 2}, "runtime": {"device": "cpu"}}
    return {
        "pools": [{"id": "cluster", "max_models_per_replica": 2,
                   "scaling": {"min_replicas": 2, "max_replicas": 2},
                   "resources": {"num_gpus": 1, "num_cpus": 0.5}}],
        "models": [tiny | {"id": m, "name": m, "seed": k, "pool": "cluster"}
                   for k, m in enumerate(POOLED, start=1)]
        + [tiny | {"id": "solo-1", "name": "solo-1", "seed": 1,
                   "scaling": {"min_replicas": 1, "max_replicas": 1},
                   "resources": {"num_cpus": 0.25}}],
    }


def pool_replica_actors(pool: str) -> list[ActorState]:
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP_NAME}#pool-{pool}#"
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [a for a in actors if (a.name or "").startswith(prefix)]


# After the packing test (it redeploys the models this one replaces), before the shards'.
def test_a_pool_spreads_its_replicas_over_the_gpu_nodes_and_serves_every_model(
        whole_gpu_app: ServeHarness) -> None:
    whole_gpu_app.deploy(pool_registry(), default_model=POOLED[0])
    wait_for_free_gpus(0)  # the pool's two replicas hold a GPU node each
    actors = pool_replica_actors("cluster")
    assert len(actors) == 2 and {a.node_id for a in actors} == gpu_nodes(), actors
    with whole_gpu_app.client() as client:
        # Three jobs of each model, interleaved: 4 models on 2 replicas holding 2 each
        # means loads, hits and (unless Serve routes perfectly) evictions.
        jobs = [(m, submit(client, model=m, seed=5)["id"]) for _ in range(3) for m in POOLED]
        reference = submit(client, model="solo-1", seed=5)["id"]
        done = all_terminal(client, [j for _, j in jobs] + [reference], 180)
        images: dict[str, set[bytes]] = {m: set() for m in POOLED}
        for model, job_id in jobs:
            record = done[job_id]
            assert record["status"] == "completed", record
            params = record["result"]["parameters"]
            replica_model, _, replica_id = params["replica"].partition("#")
            assert params["model"] == replica_model == model, params
            assert any(a.name.endswith(f"#{replica_id}") for a in actors), (params, actors)
            images[model].add(base64.b64decode(record["result"]["images"][0].split(",")[1]))
        # One image per model whichever replica drew it, a different one per checkpoint,
        # and pooled-1's is the image its own deployment draws.
        assert all(len(found) == 1 for found in images.values()), images
        assert len(set().union(*images.values())) == len(POOLED)
        solo = base64.b64decode(done[reference]["result"]["images"][0].split(",")[1])
        assert images[POOLED[0]] == {solo}
        metrics = client.get("/metrics").text
    loads = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("imagegen_pool_model_loads_total{")
                and 'pool="cluster"' in line)
    assert loads >= len(POOLED), loads  # every model loaded somewhere, at least once


def test_tracker_shards_each_run_their_models_jobs_and_losing_one_loses_nothing(
        cluster_app: ServeHarness, s3: S3Server) -> None:
    """...with their images in S3, as a cluster keeps them: every mode's images read back
    byte for byte from the ingress and from their presigned URLs."""
    redis_store().close()  # an empty Redis database, or a skip without a server
    s3.bucket("imagegen-cluster")
    cluster_app.deploy(registry(num_gpus=0.5), default_model=MODELS[0], tracker_shards=2,
                       store="redis", redis_url=REDIS_URL,
                       blob_url="s3://imagegen-cluster/images", s3_endpoint_url=s3.endpoint)
    with cluster_app.client() as client:
        # Shard 0 (`Tracker`) owns tiny-a's jobs, shard 1 (`Tracker-1`) tiny-b's.
        first = [submit(client, model=m, seed=1) for m in MODELS]
        done = all_terminal(client, [j["id"] for j in first], 120)
        assert [done[j["id"]]["status"] for j in first] == ["completed"] * 2, {
            j_id: (r["status"], r.get("error"), r.get("attempts")) for j_id, r in done.items()}

        # Shard 1 has work queued and running when its actor dies (no graceful stop).
        slow = {"width": 128, "height": 128, "steps": 25}
        b_jobs = [submit(client, model="tiny-b", seed=10 + i, **slow) for i in range(6)]
        killed = kill_replica("Tracker-1")
        # (read in Redis itself: the API would ask the dead shard for a queued job's place)
        store = RedisStore(REDIS_URL)
        left = [json.loads(record)["id"] for record in store.unfinished()]
        store.close()
        assert left, "every job of shard 1 finished before the kill: nothing was at stake"
        # The other shard needs nothing of shard 1: its jobs are accepted and complete
        # whether or not Serve has replaced shard 1 yet (no wait is asserted: how soon
        # Serve replaces an actor is Serve's).
        a_jobs = [submit(client, model="tiny-a", seed=20 + i) for i in range(3)]
        a_done = all_terminal(client, [j["id"] for j in a_jobs], 60)
        assert {r["status"] for r in a_done.values()} == {"completed"}, a_done
        replacement = replaced(killed)
        assert replacement != killed
        # Serve starts a new shard 1, which resumes its jobs from the store: none lost.
        b_done = all_terminal(client, [j["id"] for j in b_jobs], 180)
        assert {r["status"] for r in b_done.values()} == {"completed"}, b_done
        assert {r["result"]["parameters"]["model"] for r in b_done.values()} == {"tiny-b"}
        stats = client.get("/queue/status").json()  # every shard's jobs, from the store
        assert (stats["completedJobs"], stats["failedJobs"]) == (11, 0), stats
        # Every mode, on the cluster, its images in S3.
        modes = {"img2img": img2img(model="tiny-b"), "inpaint": inpaint(model="tiny-a"),
                 "style-transfer": style(model="tiny-b")}
        jobs = {m: client.post(f"/generate/{m}", json=body).json() for m, body in modes.items()}
        finals = all_terminal(client, [j["id"] for j in jobs.values()], 120)
        for job_id, final in finals.items():
            assert final["status"] == "completed", final
            data = base64.b64decode(final["result"]["images"][0].split(",", 1)[1])
            assert client.get(f"/jobs/{job_id}/images/0").content == data
            (url,) = client.get(f"/jobs/{job_id}?images=url").json()["result"]["images"]
            assert url.startswith(f"{s3.endpoint}/imagegen-cluster/images/jobs/{job_id}/")
            assert httpx.get(url, timeout=30).content == data
