"""Data-parallel training on one machine's cores: `workers` processes of one thread each,
their gradients averaged over a gloo process group on 127.0.0.1.

Contract:
- `launch(main, workers, out, *args)` runs `main(*args)` in `workers` processes (one: in
  this process, no process group) and returns worker 0's result. Worker 0 prints to this
  process's output, the others to `worker-<rank>.log` in the folder `scratch(out)`. A
  worker that fails stops them all (`WorkerFailed`).
- Every worker builds the same models (their seeds are fixed), draws its own data
  (`stream(seed)`: the seed itself on worker 0, so a one-worker run draws what the
  single-process trainer always drew) and trains on `share(n)` of each batch;
  `average_gradients(parameters)` after each backward makes every worker take the same
  optimizer step, so the weights stay equal, step after step, bit for bit (checked every
  `CHECK_EVERY` steps: `check_equal`).
- Worker 0 writes the run's folder; the others read the stages before theirs from it and
  write theirs into `scratch(out)` (diffusers' modules; transformers' write on rank 0
  only), removed at the end.
- `barrier()`, `rank()`, `workers()` are no-ops / 0 / 1 without a process group.

Why: these machines have 2 cores, and a second intra-op thread buys a process little (the
tiny UNet's ops are too small to split well). The denoiser's training step, batch 64:
1 thread 0.98 s, 2 threads 0.92 s; two 1-thread workers of 32 each, in the real loop with
its data, the all-reduce (~18 ms for the UNet's 4.6 M gradients) and the waits for the
slower worker, 0.71 s.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
from collections.abc import Callable, Iterable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STREAM_STRIDE = 7919  # a worker's data seeds: seed + rank * STREAM_STRIDE
RESULT = "result.pickle"  # worker 0's result, for `launch` to return
GRACE_S = 5.0  # after a worker fails, how long the others get to say why
CHECK_EVERY = 100  # optimizer steps between the workers' weight comparisons
_calls = 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def workers() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def stream(seed: int) -> int:
    return seed + rank() * STREAM_STRIDE


def share(n: int) -> int:
    """This worker's part of a batch (or pool) of `n`; `n` must divide evenly."""
    if n % workers():
        raise ValueError(f"{n} does not split evenly over {workers()} workers")
    return n // workers()


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Every worker's gradients replaced by their mean over the workers (one all-reduce of
    the flattened gradients). Every `CHECK_EVERY` calls (the first included) the workers
    also compare their parameters' bytes, and stop if they differ: equal weights are what
    makes the averaged gradients the whole batch's."""
    if not dist.is_initialized():
        return
    parameters = list(parameters)
    global _calls
    if _calls % CHECK_EVERY == 0:
        check_equal(parameters)
    _calls += 1
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_equal(parameters: list[torch.nn.Parameter]) -> None:
    digest = hashlib.sha1()
    for p in parameters:
        digest.update(p.detach().contiguous().numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"the training workers' weights differ after {_calls} steps "
                           f"(digests {digests}): a worker drew a model or stepped alone")


def mine(n: int) -> list[int]:
    """This worker's items of `n` (every `workers()`-th, from its rank)."""
    return list(range(rank(), n, workers()))


def gather(indices: list[int], items: list[Any], n: int) -> list[Any]:
    """Every worker's `items` (its `indices` of `n`, as `mine` gives them) put together
    in order, on every worker."""
    if not dist.is_initialized():
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(zip(indices, items, strict=True)))
    whole: list[Any] = [None] * n
    for part in parts:
        for i, item in part:
            whole[i] = item
    return whole


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def scratch(out: Path) -> Path:
    return out / ".workers"


def launch(main: Callable[..., Any], n: int, out: Path, *args: Any) -> Any:
    """`main(*args)` in `n` worker processes (see the module docstring), watched from this
    one: when a worker fails the others are stopped at once (they would wait for it in
    their next collective) and `WorkerFailed` names its log. Returns worker 0's result."""
    if n == 1:
        return main(*args)
    with socket.socket() as s:  # a free port on loopback for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = scratch(out)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, n, port, folder, main, args), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    try:
        running = list(procs)
        while running:
            wait([p.sentinel for p in running])
            for p in [p for p in running if p.exitcode is not None]:
                running.remove(p)
                if p.exitcode:  # the others soon fail too (their peer is gone): name all
                    for q in running:
                        q.join(timeout=GRACE_S)
                    raise WorkerFailed("; ".join(
                        f"training worker {r} failed (exit {q.exitcode}), see "
                        + (f"{folder}/worker-{r}.log" if r else "its output above")
                        for r, q in enumerate(procs) if q.exitcode))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    result = pickle.loads((folder / RESULT).read_bytes())
    shutil.rmtree(folder)  # the other workers' copies and logs: the run went through
    return result


class WorkerFailed(RuntimeError):
    pass


def _worker(r: int, n: int, port: int, folder: Path, main: Callable[..., Any],
            args: tuple) -> None:
    if r:  # worker 0 writes to the run's terminal; the others to their logs
        log = open(folder / f"worker-{r}.log", "w")  # noqa: SIM115 (the process's)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=n, timeout=timedelta(minutes=15))
    try:
        result = main(*args)
    finally:
        dist.destroy_process_group()
    if r == 0:
        (folder / RESULT).write_bytes(pickle.dumps(result))
