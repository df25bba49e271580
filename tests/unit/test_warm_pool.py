"""Warm workers (deployments/warm_pool.py, serve_app/generation/preload.py): how many to ask
each node for, the runtime env that must equal the model replicas' for Ray to match it,
which nodes get one, what the preload imports, and how a replica reports its start.
Through a real Ray: tests/e2e/test_scaling.py (a replica scaled up from zero lands on one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deployments.model import startup_phases
from deployments.warm_pool import WarmPolicy, fits, idle_workers, merge_runtime_env
from serve_app.builder import model_options
from serve_app.generation.preload import MODULE, ROLE_VAR, model_runtime_env
from serve_app.registry import parse_registry


def test_a_node_is_asked_for_what_it_lacks_once_until_the_grace_passes() -> None:
    policy = WarmPolicy(per_node=2, grace_s=30)
    assert policy.wanted("a", idle=0, now=0.0) == 2
    policy.asked("a", 2, now=0.0)
    # Asked for, not yet idle: on their way, not asked for again.
    assert policy.wanted("a", idle=0, now=10.0) == 0
    assert policy.wanted("a", idle=1, now=12.0) == 0
    # Nothing arrived within the grace: asked again.
    assert policy.wanted("a", idle=0, now=31.0) == 2
    # Another node is its own.
    assert policy.wanted("b", idle=1, now=31.0) == 1


def test_after_the_workers_arrive_a_taken_one_is_replaced_at_once() -> None:
    policy = WarmPolicy(per_node=1, grace_s=30)
    policy.asked("a", 1, now=0.0)
    assert policy.wanted("a", idle=1, now=2.0) == 0  # arrived: the request is settled
    # A replica took it two seconds later: replaced without waiting out the grace.
    assert policy.wanted("a", idle=0, now=4.0) == 1


def test_nodes_that_left_are_forgotten() -> None:
    policy = WarmPolicy(per_node=1)
    policy.asked("gone", 1, now=0.0)
    policy.asked("here", 1, now=0.0)
    policy.forget(["here"])
    assert policy.wanted("gone", idle=0, now=1.0) == 1
    assert policy.wanted("here", idle=0, now=1.0) == 0


def test_the_warm_env_is_the_app_env_with_the_role_as_serve_merges_it() -> None:
    app_env = {"env_vars": {"IMAGEGEN_STORE": "redis"}, "pip": ["x"]}
    merged = merge_runtime_env(app_env, model_runtime_env())
    assert merged == {"pip": ["x"], "env_vars": {"IMAGEGEN_STORE": "redis", ROLE_VAR: "model",
                                                 "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}}
    assert app_env == {"env_vars": {"IMAGEGEN_STORE": "redis"}, "pip": ["x"]}  # untouched
    assert merge_runtime_env({}, model_runtime_env()) == model_runtime_env()


def test_every_model_deployment_runs_with_the_role_in_its_env() -> None:
    registry = parse_registry({"models": [
        {"id": "m", "name": "m", "description": "m", "source": "tiny",
         "resources": {"num_cpus": 2}}]}, "test")
    options = model_options(registry.get("m"))["ray_actor_options"]
    assert options == {"num_cpus": 2, "num_gpus": 0, "runtime_env": model_runtime_env()}


def test_warm_workers_go_where_a_model_replica_fits() -> None:
    gpu_model = [{"CPU": 1, "GPU": 1}]
    assert fits({"CPU": 8, "GPU": 1}, gpu_model)
    assert not fits({"CPU": 8}, gpu_model)  # a CPU-only head node gets none
    assert fits({"CPU": 1}, [{"CPU": 1, "GPU": 0}])
    assert fits({"CPU": 1}, [*gpu_model, {"CPU": 0.5, "GPU": 0}])


def test_idle_workers_are_the_jobs_workers_with_no_actor_and_no_task() -> None:
    from ray.core.generated.common_pb2 import CoreWorkerStats, WorkerType

    job, other, nil = bytes.fromhex("01000000"), bytes.fromhex("02000000"), b"\xff" * 16

    def worker(**kw: object) -> CoreWorkerStats:
        fields = {"worker_type": WorkerType.WORKER, "job_id": job, "actor_id": nil} | kw
        return CoreWorkerStats(**fields)

    stats = [
        worker(),  # warm and idle
        worker(actor_id=b""),  # idle, "no actor" left empty
        worker(actor_id=bytes.fromhex("ab" * 16)),  # a replica now
        worker(num_executed_tasks=3),  # ran tasks: not one of ours
        worker(job_id=other),  # another job's
        worker(job_id=b"\xff" * 4),  # prestarted by Ray for no job yet
        worker(worker_type=WorkerType.DRIVER),
    ]
    assert idle_workers(stats, job) == 2


# What would touch CUDA (and, once touched, fix the devices this process sees before Ray
# sets CUDA_VISIBLE_DEVICES for the replica it becomes). In a model worker, torch is
# imported first and these are wrapped to record calls before the preload runs.
_CUDA_PROBE = """
import os, torch
calls = []
def watch(owner, name):
    real = getattr(owner, name, None)
    if real is not None:
        def spy(*a, **k):
            calls.append([name, os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")])
            return real(*a, **k)
        setattr(owner, name, spy)
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device",
             "get_device_properties", "get_device_capability", "is_bf16_supported"):
    watch(torch.cuda, name)
watch(torch._C, "_cuda_getDeviceCount")
"""


def _preload(env: dict[str, str]) -> dict[str, object]:
    probe = _CUDA_PROBE if env.get(ROLE_VAR) == "model" else "calls = None\n"
    code = (probe + "import json, sys, " + MODULE + " as p\n"
            "print(json.dumps({'torch': 'torch' in sys.modules,"
            " 'diffusers': 'diffusers' in sys.modules, 'runner':"
            " 'serve_app.generation.runner' in sys.modules,"
            " 'done': p.IMPORTS_DONE is not None, 'cuda_calls': calls}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_preload_imports_the_replica_code_only_in_a_model_worker() -> None:
    env = {k: v for k, v in os.environ.items() if k != ROLE_VAR}
    assert _preload(env | {ROLE_VAR: ""}) == {
        "torch": False, "diffusers": False, "runner": False, "done": False,
        "cuda_calls": None}
    # ...and never initializes CUDA: a warm worker must not settle which GPUs it sees
    # before Ray assigns the replica's. Counting GPUs through NVML is allowed (torchao,
    # which diffusers imports when installed, asks is_available() at import).
    found = _preload(env | {ROLE_VAR: "model"})
    calls = found.pop("cuda_calls")
    assert found == {"torch": True, "diffusers": True, "runner": True, "done": True}
    assert all(name in ("is_available", "device_count") and nvml == "1"
               for name, nvml in calls), calls


def test_a_replica_reports_whether_its_process_was_warm() -> None:
    # Imports done 20 s before the replica was put on a 30 s old process: warm.
    warm = startup_phases(born=100.0, began=130.0, ready=130.4,
                          preload_started=101.0, preload_done=110.0)
    assert warm == {"warm_worker": True, "process_age_s": 30.0, "preload_s": 9.0,
                    "idle_before_s": 20.0, "init_s": 0.4}
    # A process Ray started for the replica: the preload ran first, then at once the
    # constructor. The imports were on the replica's time: not warm.
    fresh = startup_phases(born=100.0, began=112.2, ready=112.6,
                           preload_started=101.0, preload_done=112.0)
    assert (fresh["warm_worker"], fresh["idle_before_s"]) == (False, 0.2)
    # No preload (Ray not told to): everything happens in the constructor.
    cold = startup_phases(born=100.0, began=101.5, ready=113.5,
                          preload_started=None, preload_done=None)
    assert cold == {"warm_worker": False, "process_age_s": 1.5, "preload_s": None,
                    "idle_before_s": None, "init_s": 12.0}
