"""`imagegen`: run the service locally, or build the embedded tiny models.

    imagegen serve [--config config/serve.yaml]   # Ray on loopback, API on PORT (3003)
    imagegen build-tiny-models                    # into IMAGEGEN_CACHE_DIR

`serve` starts a lean local Ray (loopback only, no dashboard, capped object store),
deploys the application of the serve config, and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.errors import ConfigError
from serve_app.generation.preload import MODULE as PRELOAD_MODULE
from serve_app.registry import resolve_config_path
from serve_app.runfile import RunFile, end
from serve_app.settings import load_settings

# Serve's lean request path (the cluster files set the same): each ingress replica answers
# HTTP itself behind Serve's HAProxy (no Python proxy hop), handles talk gRPC, and user code
# and router share the replica's event loop. Measured on the submit path: 4x the accepted/s
# of the default proxy (bench/README.md).
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
# Ray reads these itself, once, when `ray` / `ray.serve` is first imported: set them before
# that so a local run stays on loopback. On one machine HAProxy reloads its replica list at
# once, so an ingress replica need not hold its port open for Serve's 30 s default drain.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Every worker Ray starts imports this first: in a model replica's (warm) worker it
    # loads torch and diffusers before the replica needs them (deployments/warm_pool.py).
    "RAY_preload_python_modules": PRELOAD_MODULE,
    **SERVE_FAST_PATH_ENV,
}
OBJECT_STORE_BYTES = 256 * 1024 * 1024
# Ctrl-C: how long Serve may take to stop its replicas and HAProxy before Ray is stopped.
STOP_GRACE_S = 1.0
LOOPBACK_OR_ANY = frozenset({"127.0.0.1", "0.0.0.0", "::", "::1", "localhost"})
HAPROXY_SIDE_PORTS = frozenset({"RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"})
_PORTS_SET_BY_USER = HAPROXY_SIDE_PORTS & os.environ.keys()


def local_ray_env() -> None:
    """Set the local Ray environment (an explicit setting of the caller's wins)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def start_local_ray(num_cpus: int | None = None) -> None:
    local_ray_env()
    # HAProxy's stats page and Prometheus listener take fixed ports (8404, 9101) unless
    # told otherwise: free ones let two local instances (a dev server and the tests) live
    # side by side. Ray's workers read them from the environment ray.init hands over.
    for key in HAPROXY_SIDE_PORTS - _PORTS_SET_BY_USER:
        os.environ[key] = str(free_port())
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_serve_config(path: str | Path) -> dict[str, Any]:
    resolved = resolve_config_path(path)
    try:
        config = yaml.safe_load(resolved.read_text())
    except OSError as exc:
        raise ConfigError(f"Cannot read serve config {resolved}: {exc}") from None
    apps = config.get("applications") if isinstance(config, dict) else None
    if not apps:
        raise ConfigError(f"Serve config {resolved} has no applications")
    return dict(config)


def serve_forever(config_path: str) -> None:
    config = load_serve_config(config_path)
    app_config = config["applications"][0]
    settings = load_settings(app_config.get("args", {}).get("settings"))
    http = dict(config.get("http_options") or {})
    # PORT / IMAGEGEN_HOST (via settings) win over the YAML, as the seed's PORT does.
    if "PORT" in os.environ or "port" not in http:
        http["port"] = settings.port
    if "IMAGEGEN_HOST" in os.environ or "host" not in http:
        http["host"] = settings.host
    settings.check_exposure(http["host"])
    # A previous run that was killed (not stopped) left its Ray and HAProxy behind.
    runfile = RunFile(settings.data_dir)
    ended = runfile.clear_leftovers(http["host"], http["port"])
    if ended:
        print(f"imagegen: ended {ended} processes a previous run left behind", flush=True)

    try:
        start_local_ray()
        runfile.keep(http["port"])
        # ray.init installs Ray's own SIGTERM handler (it aborts the process): take SIGTERM
        # back, to stop the service the way Ctrl-C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        from ray import serve

        from serve_app.builder import build_app

        logging_config = config.get("logging_config")
        serve.start(http_options=http, logging_config=logging_config)
        serve.run(
            build_app(app_config.get("args")),
            name=app_config.get("name", "imagegen"),
            route_prefix=app_config.get("route_prefix", "/"),
            # serve.start's logging_config covers Serve's own actors; the app's replicas
            # (ingress, tracker, models) take theirs from here.
            logging_config=logging_config,
        )
        local = "localhost" if http["host"] in LOOPBACK_OR_ANY else http["host"]
        print(f"imagegen is serving on http://{http['host']}:{http['port']}\n"
              f"playground: http://{local}:{http['port']}/  (Ctrl-C stops it)", flush=True)
        threading.Event().wait()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        stop_local_ray()
        runfile.release()


def stop_local_ray(grace_s: float = STOP_GRACE_S) -> None:
    """Stop Serve and the local Ray this command started, in about `grace_s` + 3 s.

    Serve's own shutdown waits for every replica's graceful_shutdown_timeout_s (600 s for a
    model, sized for long GPU jobs) until its client gives up after 30 s: Ctrl-C took 10 s
    idle and 19 s with jobs running here. A hard stop loses no job (every transition is in
    the store; running jobs are re-queued at the next start), so Serve gets `grace_s` to
    stop cleanly, then ray.shutdown() ends the processes Ray tracks, then whatever this
    process started that is still alive (Serve's HAProxy, agents that outlive the raylet)
    is ended too, and only that.
    """
    import asyncio

    import psutil
    import ray
    from ray import serve

    # A second Ctrl-C would interrupt the stop and leave processes behind; it is short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = psutil.Process().children(recursive=True)
    began = time.monotonic()
    serve_s = ray_s = 0.0
    if ray.is_initialized():
        with contextlib.suppress(Exception):  # a timeout, or a Ray already going: stop it
            asyncio.run(asyncio.wait_for(serve.shutdown_async(), grace_s))
        serve_s = time.monotonic() - began
        ray.shutdown()
        ray_s = time.monotonic() - began - serve_s
    leftovers = end(started)
    print(f"imagegen stopped in {time.monotonic() - began:.1f} s (Serve {serve_s:.1f} s, "
          f"Ray {ray_s:.1f} s, {leftovers} leftover processes ended)", flush=True)


def build_tiny_models(config: str = "config/models.yaml") -> None:
    """Build the registry's seeded tiny models (`tiny*` sources) into the cache; the trained
    ones ship in the package and need nothing."""
    from serve_app.generation.tiny import ensure_tiny_model
    from serve_app.registry import load_registry, resolve_config_path

    settings = load_settings()
    from serve_app.generation.upscalers import weights_file

    registry = load_registry(resolve_config_path(config))
    for spec in registry.models:
        if spec.is_built:
            path = ensure_tiny_model(spec.source, spec.weights_path(settings), spec.seed)
            print(f"{spec.id}: built {path}")
        elif spec.source == "trained":
            print(f"{spec.id}: trained, shipped at {spec.weights_path(settings)}")
    for upscaler in registry.upscalers:
        if upscaler.source == "tiny-esrgan":  # the seeded test upscaler(s)
            print(f"{upscaler.name}: {weights_file(upscaler.ref(), settings)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the service locally")
    run.add_argument("--config", default="config/serve.yaml")
    sub.add_parser("build-tiny-models", help="build the embedded tiny models")
    dep = sub.add_parser("deploy", help="serve deploy, with the model registry inlined")
    dep.add_argument("config", nargs="?", default="config/serve.yaml")
    dep.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS",
                                                         "http://localhost:8265"))
    args = parser.parse_args(argv)
    try:
        if args.command == "deploy":
            from serve_app.deploy import deploy

            deploy(args.config, args.address)
            print(f"imagegen: sent {args.config} (registry inlined) to {args.address}; "
                  "`serve status` shows the rollout")
        elif args.command == "serve":
            serve_forever(args.config)
            # Ray's native side takes another 1.5-2.5 s to tear down at interpreter exit,
            # after ray.shutdown() and with nothing left to clean up: skip it.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        else:
            build_tiny_models()
    except ConfigError as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
