"""Warm workers: idle Ray worker processes, one (or more) per node, with a model replica's
imports already done, so a model scaled up from zero skips ~10 s of imports.

A replica is a Ray actor and every actor gets a worker process of its own: from a cold
process that is ~1 s of interpreter and Ray start-up, then ~10 s of torch, diffusers and
transformers imports (bench/coldstart.py), before the pipeline loads in a fraction of a
second. Ray's raylet keeps a pool of idle workers and hands an actor one whose job and
runtime env match, and it will start workers ahead of need when asked (its
`PrestartWorkers` call, with a keep-alive). So the tracker asks each node's raylet for
workers with the model deployments' runtime env (`IMAGEGEN_ROLE=model`, which makes
`serve_app.generation.preload` import the replica's code in them) and tops them up as
replicas take them. Ray still decides where every replica goes and which process runs it;
this only makes sure a fitting process is already there.

Costs: one idle process per node holding the imports (~0.5 GB of host memory, no GPU
memory: CUDA is not touched before a replica runs), and ~10 s of one CPU per top-up.
`IMAGEGEN_WARM_WORKERS=0` turns it off. `PrestartWorkers` is not part of Ray's public API:
any failure of it is logged once and costs only the cold start it would have saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray

from serve_app.generation.preload import MODEL_ROLE, ROLE_VAR, model_runtime_env

log = logging.getLogger(__name__)

# How long the raylet keeps a prestarted idle worker; the pool asks again after.
KEEP_ALIVE_S = 3600
# A worker asked for and not yet seen idle is counted as coming for this long.
STARTING_GRACE_S = 10.0
RPC_TIMEOUT_S = 5.0


@dataclass
class WarmPolicy:
    """How many workers to ask each node for: up to `per_node` idle ones, counting those
    asked for in the last `grace_s` as on their way. Plain logic; `WarmPool` feeds it."""

    per_node: int
    grace_s: float = STARTING_GRACE_S
    _asked: dict[str, tuple[float, int]] = field(default_factory=dict)

    def wanted(self, node: str, idle: int, now: float) -> int:
        if idle >= self.per_node:
            self._asked.pop(node, None)  # what was asked for has arrived
            return 0
        asked_at, asked = self._asked.get(node, (0.0, 0))
        coming = asked if now - asked_at < self.grace_s else 0
        return max(0, self.per_node - idle - coming)

    def asked(self, node: str, count: int, now: float) -> None:
        self._asked[node] = (now, count)

    def forget(self, alive: Sequence[str]) -> None:
        for node in set(self._asked) - set(alive):
            del self._asked[node]


def merge_runtime_env(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, env_vars merged, as Serve merges an app's runtime env into a
    deployment's: the result must equal the model replicas' env for Ray to match it."""
    merged = {**base, **{k: v for k, v in extra.items() if k != "env_vars"}}
    env_vars = {**base.get("env_vars", {}), **extra.get("env_vars", {})}
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def fits(node_resources: Mapping[str, float], needs: Sequence[Mapping[str, float]]) -> bool:
    """Could one replica of any of the models (`needs`: their Ray resources) run here?"""
    return any(all(node_resources.get(name, 0.0) >= amount
                   for name, amount in need.items() if amount > 0)
               for need in needs)


class WarmPool:
    """Keeps `per_node` warm workers on every alive node a model replica fits on. Blocking
    (gRPC to the raylets): run `top_up` in a thread."""

    def __init__(self, per_node: int, needs: Sequence[Mapping[str, float]]) -> None:
        self._policy = WarmPolicy(per_node)
        self._needs = [dict(n) for n in needs]
        self._stubs: dict[str, Any] = {}
        self._failed = False
        context = ray.get_runtime_context()
        self._job_id = bytes.fromhex(context.get_job_id())
        from ray._private.utils import get_runtime_env_info
        from ray.runtime_env import RuntimeEnv

        env = merge_runtime_env(dict(context.runtime_env), model_runtime_env())
        # What the raylet matches a replica's runtime env against (Ray's own encoding).
        self._env_info = get_runtime_env_info(RuntimeEnv(**env), is_job_runtime_env=False,
                                              serialize=False)

    def top_up(self) -> dict[str, int]:
        """Ask for the workers each node lacks; returns the idle warm workers seen per node."""
        from ray.core.generated import common_pb2, node_manager_pb2

        nodes = [n for n in ray.nodes()
                 if n.get("Alive") and fits(n.get("Resources", {}), self._needs)]
        self._policy.forget([n["NodeID"] for n in nodes])
        seen: dict[str, int] = {}
        now = time.monotonic()
        for node in nodes:
            node_id = node["NodeID"]
            try:
                stub = self._stub(node)
                idle = self._idle(stub)
                seen[node_id] = idle
                want = self._policy.wanted(node_id, idle, now)
                if not want:
                    continue
                stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
                    language=common_pb2.Language.PYTHON, job_id=self._job_id,
                    runtime_env_info=self._env_info, keep_alive_duration_secs=KEEP_ALIVE_S,
                    num_workers=want), timeout=RPC_TIMEOUT_S)
                self._policy.asked(node_id, want, now)
                log.info("asked node %s for %d warm model worker(s)", node_id[:8], want)
            except Exception as exc:  # grpc errors, an older Ray without the call
                self._stubs.pop(node_id, None)
                if not self._failed:
                    log.warning("warm workers unavailable on node %s (%s: %s); model "
                                "replicas start from cold processes", node_id[:8],
                                type(exc).__name__, exc)
                    self._failed = True
        return seen

    def _stub(self, node: Mapping[str, Any]) -> Any:
        stub = self._stubs.get(node["NodeID"])
        if stub is None:
            from ray._private.grpc_utils import init_grpc_channel
            from ray.core.generated import node_manager_pb2_grpc

            address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
            stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))
            self._stubs[node["NodeID"]] = stub
        return stub

    def _idle(self, stub: Any) -> int:
        """Idle workers of this job on the node: the job's actors and tasks are ours, so
        these are the workers this pool asked for."""
        from ray.core.generated import node_manager_pb2

        reply = stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(
            include_memory_info=False), timeout=RPC_TIMEOUT_S)
        return idle_workers(reply.core_workers_stats, self._job_id)


def idle_workers(stats: Sequence[Any], job_id: bytes) -> int:
    """Of a raylet's `CoreWorkerStats`: the job's workers that hold no actor and never ran
    a task. Ray writes "no actor" as an id of all 0xff bytes."""
    from ray.core.generated import common_pb2

    return sum(1 for w in stats
               if w.worker_type == common_pb2.WorkerType.WORKER
               and not w.actor_id.strip(b"\xff")
               and w.job_id == job_id and not w.num_executed_tasks)


def local_idle_warm_workers() -> list[psutil.Process]:
    """The idle warm workers of a Ray this process started (tests, benchmarks): its
    children titled `ray::IDLE` whose environment marks them as a model replica's."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if (proc.cmdline()[:1] == ["ray::IDLE"]
                    and proc.environ().get(ROLE_VAR) == MODEL_ROLE):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_local_warm_worker(timeout_s: float = 180.0) -> float:
    """Wait until one of `local_idle_warm_workers` has its imports done (its CPU at rest
    for a second); returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        for proc in local_idle_warm_workers():
            try:
                if proc.cpu_percent(interval=1.0) < 2.0 and proc.cmdline()[:1] == ["ray::IDLE"]:
                    return time.perf_counter() - t0
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise TimeoutError(f"no warm worker was ready within {timeout_s:g} s")
