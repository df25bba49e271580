"""`imagegen deploy`: `serve deploy`, with each application's model registry inlined.

Serve rebuilds an application on `serve deploy` only when its `import_path`, `runtime_env`
or `args` change, and `args.models: config/models.yaml` names a file whose edits change
none of them. Inlining the registry's content into `args` makes it part of what Serve
compares: a changed registry redeploys, an unchanged one is a no-op. The registry read is
the one next to the serve config on this machine, so it travels with the deploy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from serve_app.errors import ConfigError
from serve_app.registry import load_registry


def inline_registries(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """`config` (a serve config) with every `args.models` path replaced by the registry
    it names (checked: a broken registry stops the deploy here, not on the cluster)."""
    out = copy.deepcopy(config)
    for app in out.get("applications") or []:
        args = app.get("args") or {}
        models = args.get("models", "config/models.yaml")
        if isinstance(models, str):
            path = Path(models)
            registry = load_registry(path if path.is_absolute() else base / path)
            args["models"] = registry.model_dump(mode="json", exclude_defaults=True)
            app["args"] = args
    return out


def deploy(config_path: str, address: str) -> dict[str, Any]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    path = Path(config_path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read serve config {path}: {exc}") from None
    # Relative registry paths resolve as the builder resolves them: from the project root,
    # which is the serve config's folder's parent for config/*.yaml.
    base = path.resolve().parent.parent if path.parent.name == "config" else Path.cwd()
    inlined = inline_registries(config, base)
    schema = ServeDeploySchema.model_validate(inlined)
    ServeSubmissionClient(address).deploy_applications(schema.model_dump(exclude_unset=True))
    return inlined
