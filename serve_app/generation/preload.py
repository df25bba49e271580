"""What a model replica's process imports before it is one.

Ray imports this module in every worker process it starts when the raylet runs with
`RAY_preload_python_modules=serve_app.generation.preload` (`imagegen serve`, the tests,
cluster.yaml and config/rayservice.yaml set it). In a process started for a model replica
(`IMAGEGEN_ROLE=model` in its runtime env: the builder gives every model deployment that
env, and the tracker's warm pool asks each node's raylet for idle workers with the same
one, see `deployments/warm_pool.py`) it imports torch, diffusers, transformers and the
replica's own code before the process takes any work. A replica placed on such a worker
starts without those ~10 s of imports. Anywhere else (the controller, the proxy, the
ingress, the tracker) importing it does nothing.
"""

from __future__ import annotations

import os
import time

ROLE_VAR = "IMAGEGEN_ROLE"
MODEL_ROLE = "model"
# torch.cuda.is_available() through NVML: it counts the GPUs without initializing CUDA, so
# a module that asks at import (torchao does, and diffusers imports torchao when it is
# installed) does not fix the process's visible GPUs before Ray assigns the replica's.
NVML_CHECK = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
MODULE = __name__

# Wall-clock seconds (time.time()) at which the imports began and ended in this process;
# None where they did not run here (not a model worker, or Ray does not preload).
IMPORTS_STARTED: float | None = None
IMPORTS_DONE: float | None = None


def model_runtime_env() -> dict[str, dict[str, str]]:
    """The runtime env that marks a worker process as a model replica's."""
    return {"env_vars": {ROLE_VAR: MODEL_ROLE, **NVML_CHECK}}


def _import_replica_code() -> None:
    global IMPORTS_STARTED, IMPORTS_DONE
    IMPORTS_STARTED = time.time()
    for name, value in NVML_CHECK.items():
        os.environ.setdefault(name, value)
    import ray.serve  # noqa: F401  (the replica shell and Serve's replica machinery)

    import serve_app.generation.runner
    import serve_app.generation.worker  # noqa: F401

    IMPORTS_DONE = time.time()


if os.environ.get(ROLE_VAR) == MODEL_ROLE:
    _import_replica_code()
