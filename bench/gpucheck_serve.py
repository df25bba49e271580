"""The GPU check's end-to-end case: one job through Ray Serve, the model placed by the app
itself (`runtime.device: auto` → the GPU, in fp16: serve_app.placement).

The random SD 1.5 is saved as a diffusers checkpoint and registered as a real model beside
the embedded tiny one; a local Ray (with the machine's GPU) serves the app; the job is
submitted over HTTP and polled to completion; GET /models must show the model on the GPU.
In a dry run the tiny model's shapes stand in, on a CPU, with a default job small enough
for the placement check to serve it there.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any


def serve_one_job(check: Any) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray does not import here (its wheel is larger than the device "
                           "tool's 64 MiB carry): the Serve path is covered by the e2e tests"}
    from bench.architectures import build

    size, steps = (64, 2) if check.dry else (512, 30)
    folder = check.workdir / "models" / "sd15-random"
    dtype = check.torch.float32 if check.dry else check.torch.float16
    pipe = build("sd", check.workdir, check.device, dtype, dry=check.dry)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    check.free()
    registry = {"models": [
        {"id": "tiny-sd", "name": "tiny", "description": "embedded", "source": "tiny"},
        {"id": "sd15-random", "name": "SD 1.5 (random)", "description": "random weights",
         "path": str(folder), "defaults": {"width": size, "height": size, "steps": steps},
         "scaling": {"min_replicas": 1, "max_replicas": 1}},
    ]}
    settings = {"store": "sqlite", "data_dir": str(check.workdir / "data"),
                "cache_dir": str(check.workdir / "cache"), "default_model": "tiny-sd",
                "submit_rate": 0, "read_rate": 0,
                "accelerator": "none" if check.dry else "auto"}
    return _serve(registry, settings, size, steps)


def _serve(registry: dict[str, Any], settings: dict[str, Any], size: int,
           steps: int) -> dict[str, Any]:
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.cli import free_port, start_local_ray, stop_local_ray

    began = time.perf_counter()
    start_local_ray()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": False})
        serve.run(build_app({"models": registry, "settings": settings}), name="imagegen",
                  route_prefix="/")
        ready_s = time.perf_counter() - began
        url = f"http://127.0.0.1:{port}"
        models = {m["id"]: m for m in _json(f"{url}/models")["models"]}
        job = _json(f"{url}/generate/text2img", {"prompt": "a horse", "model": "sd15-random",
                                                 "width": size, "height": size,
                                                 "steps": steps, "seed": 1})
        submitted = time.perf_counter()
        while job["status"] not in ("completed", "failed", "cancelled"):
            if time.perf_counter() - submitted > 300:
                break
            time.sleep(0.2)
            job = _json(f"{url}/jobs/{job['id']}")
        model = models["sd15-random"]
        return {"status": job["status"], "error": job.get("error"),
                "device": model["device"], "num_gpus": model["numGpus"],
                "served": model["served"], "unavailable": model["unavailable"],
                "app_ready_s": round(ready_s, 1),
                "job_s": round(time.perf_counter() - submitted, 2),
                "time_taken_ms": (job.get("result") or {}).get("timeTaken")}
    finally:
        stop_local_ray()


def _json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.loads(response.read()))
