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
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from serve_app.errors import ConfigError
from serve_app.registry import resolve_config_path
from serve_app.settings import load_settings

# Ray reads these itself; set before Ray is imported so a local run stays on loopback.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def start_local_ray(num_cpus: int | None = None) -> None:
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
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
    for source, name in (("tiny", "tiny-sd"), ("tiny-inpaint", "tiny-sd-inpaint")):
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
