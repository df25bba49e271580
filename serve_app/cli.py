"""`imagegen`: run the service locally, or build the embedded tiny models.

    imagegen serve [--config config/serve.yaml]   # Ray on loopback, API on PORT (3003)
    imagegen build-tiny-models                    # into IMAGEGEN_CACHE_DIR

`serve` starts a lean local Ray (loopback only, no dashboard, capped object store),
deploys the application of the serve config, and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from serve_app.errors import ConfigError
from serve_app.registry import resolve_config_path
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
    **SERVE_FAST_PATH_ENV,
}
OBJECT_STORE_BYTES = 256 * 1024 * 1024
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

    start_local_ray()
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
    print(f"imagegen is serving on http://{http['host']}:{http['port']}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


def build_tiny_models() -> None:
    from serve_app.generation.tiny import ensure_tiny_model

    settings = load_settings()
    for source, name in (("tiny", "tiny-sd"), ("tiny-inpaint", "tiny-sd-inpaint"),
                         ("tiny-sdxl", "tiny-sdxl"), ("tiny-flux", "tiny-flux"),
                         ("tiny-sd3", "tiny-sd3")):
        path = ensure_tiny_model(source, Path(settings.cache_dir) / name)
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the service locally")
    run.add_argument("--config", default="config/serve.yaml")
    sub.add_parser("build-tiny-models", help="build the embedded tiny models")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve_forever(args.config)
        else:
            build_tiny_models()
    except ConfigError as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
