"""The cluster deployment files, checked with Ray's own validators (no Ray cluster needed).

- cluster.yaml: the cluster launcher's `prepare_config` + `validate_config` (jsonschema
  against ray/autoscaler/ray-schema.json), exactly what `ray up` runs before launching.
- config/serve*.yaml and the RayService's serveConfigV2: `ServeDeploySchema`, what
  `serve deploy` and KubeRay submit; their args through `AppArgs`, `load_settings` and
  `load_registry`, as the app builder reads them on the cluster.
- Every registry model's deployment options: Serve's `DeploymentSchema`,
  `AutoscalingConfig` and `RayActorOptionsSchema` (which ignore unknown keys, so the key
  names are checked too).
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray._private.utils import update_envs
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeDeploySchema

from serve_app.builder import AppArgs, build_app, model_options, resolve
from serve_app.cli import LOCAL_RAY_ENV
from serve_app.errors import ConfigError
from serve_app.generation.preload import MODULE as PRELOAD_MODULE
from serve_app.registry import Registry, load_registry
from serve_app.settings import ENV_VARS, load_settings

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = ["config/serve.yaml", "config/serve.gpu.yaml"]
REGISTRIES = ["config/models.yaml", "config/models.gpu.yaml"]
TORCH_PIN = "torch==2.13.0"
REDIS_PORT = "6380"  # on the head, next to Ray's GCS on 6379


def load_yaml(relpath: str) -> Any:
    return yaml.safe_load((ROOT / relpath).read_text())


def rayservice() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "config/rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    return service


def rayservice_resources(kind: str) -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((ROOT / "config/rayservice.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def ray_pod_specs(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def dockerfile_ray_image() -> str:
    match = re.search(r"^ARG RAY_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile names its base image in ARG RAY_IMAGE"
    return match.group(1)


def cluster_config() -> dict[str, Any]:
    return load_yaml("cluster.yaml")


def app_settings_env(app: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                     redis_addr: str, redis_password: str = "pw") -> dict[str, str]:
    """The app's runtime_env env_vars as a Ray worker sees them: expanded by Ray itself
    (`${VAR}` from the node's environment, as exported before `ray start`)."""
    env_vars: dict[str, str] = (app.get("runtime_env") or {}).get("env_vars") or {}
    monkeypatch.setenv("IMAGEGEN_REDIS_ADDR", redis_addr)
    monkeypatch.setenv("IMAGEGEN_REDIS_PASSWORD", redis_password)
    for key, value in env_vars.items():
        if f"${{{key}}}" not in value:  # (one passed through from the node keeps its value)
            monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    update_envs(env_vars)
    return {key: os.environ[key] for key in env_vars}


# --- cluster launcher ---------------------------------------------------------------


def test_cluster_yaml_passes_the_launchers_own_validation() -> None:
    # What `ray up` does before it launches anything: defaults merged, then the schema.
    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    assert prepared["cluster_name"] == "imagegen"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"


def test_cluster_has_a_cpu_head_and_zero_to_four_gpu_workers() -> None:
    config = cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 8}
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] == 1
    assert (worker["min_workers"], worker["max_workers"]) == (0, 4)
    assert config["max_workers"] == 4


def test_cluster_mounts_the_project_and_the_weights() -> None:
    config = cluster_config()
    assert config["file_mounts"]["~/imagegen"] == "."
    assert "/models" in config["file_mounts"]
    assert load_yaml("config/serve.gpu.yaml")["applications"][0]["args"]["settings"][
        "model_path"] == "/models"


def test_cluster_setup_installs_cuda_torch_before_the_project() -> None:
    commands = cluster_config()["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if TORCH_PIN in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and "-e ." in c)
    assert "download.pytorch.org/whl/cu12" in commands[torch_at]
    assert torch_at < project_at
    assert "cd ~/imagegen" in commands[project_at]


def test_cluster_runs_the_dockerfiles_base_image() -> None:
    assert cluster_config()["docker"]["image"] == dockerfile_ray_image()


def test_cluster_head_runs_redis_and_every_node_exports_its_address() -> None:
    config = cluster_config()
    head_setup = " ".join(config["head_setup_commands"])
    assert f"redis-server --port {REDIS_PORT}" in head_setup
    assert "boto3" in head_setup  # the head's autoscaler launches the GPU nodes
    for start, expected_host in ((config["head_start_ray_commands"], "$(hostname -I"),
                                 (config["worker_start_ray_commands"], "$RAY_HEAD_IP")):
        command = " ".join(start)
        match = re.search(r'export IMAGEGEN_REDIS_ADDR="([^"]+)";', command)
        assert match, command
        assert match.group(1).startswith(expected_host)
        assert match.group(1).endswith(f":{REDIS_PORT}")
        # Exported in the same shell before `ray start`: Ray's processes inherit it.
        assert match.end() < command.index("ray start")


def test_every_node_preloads_the_model_workers_imports() -> None:
    # Without it the tracker's warm workers start without torch (docs/coldstart.md).
    preload = f"export RAY_preload_python_modules={PRELOAD_MODULE};"
    config = cluster_config()
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        command = " ".join(start)
        assert preload in command and command.index(preload) < command.index("ray start")
    for pod in ray_pod_specs(rayservice()):
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_preload_python_modules"] == PRELOAD_MODULE
    assert LOCAL_RAY_ENV["RAY_preload_python_modules"] == PRELOAD_MODULE
    importlib.import_module(PRELOAD_MODULE)  # importable, and a no-op here


def test_cluster_redis_wants_a_password_and_is_not_on_every_interface() -> None:
    config = cluster_config()
    head_setup = " ".join(config["head_setup_commands"])
    assert "--requirepass" in head_setup and "--protected-mode yes" in head_setup
    assert "0.0.0.0" not in head_setup and "--protected-mode no" not in head_setup
    assert config["file_mounts"]["~/imagegen-secrets"] == "~/.imagegen/secrets"


def test_cluster_turns_ray_token_auth_on_everywhere_and_keeps_the_dashboard_local() -> None:
    config = cluster_config()
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        command = " ".join(start)
        assert "RAY_AUTH_MODE=token" in command
        assert "RAY_AUTH_TOKEN_PATH=~/imagegen-secrets/ray-token" in command
        assert command.index("RAY_AUTH_MODE") < command.index("ray start")
        assert "IMAGEGEN_REDIS_PASSWORD" in command and "IMAGEGEN_API_KEYS_FILE" in command
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


# --- serve configs ------------------------------------------------------------------


@pytest.mark.parametrize("relpath", SERVE_CONFIGS)
def test_serve_config_passes_serve_deploy_schema_and_the_app_builders_checks(
    relpath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_yaml(relpath)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert app["import_path"] == "serve_app.builder:build_app"
        args = AppArgs.model_validate(app.get("args") or {})
        env = app_settings_env(app, monkeypatch, redis_addr="10.0.0.5:6380")
        load_settings(args.settings, env=env)
        assert isinstance(args.models, str)
        load_registry(args.models)


def test_gpu_serve_config_serves_http_on_every_node_from_redis() -> None:
    config = ServeDeploySchema.model_validate(load_yaml("config/serve.gpu.yaml"))
    assert config.proxy_location == "EveryNode"
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 3003)
    (app,) = config.applications
    assert app.name == "imagegen"
    assert app.args["models"] == "config/models.gpu.yaml"
    settings = load_settings(app.args["settings"], env={})
    assert (settings.store, settings.model_path, settings.default_model) == (
        "redis", "/models", "stable-diffusion-v1.5")


def test_gpu_serve_config_points_the_store_at_the_nodes_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (app,) = load_yaml("config/serve.gpu.yaml")["applications"]
    env = app_settings_env(app, monkeypatch, redis_addr=f"10.0.0.5:{REDIS_PORT}")
    settings = load_settings(app["args"]["settings"], env=env)
    assert settings.redis_url == f"redis://:pw@10.0.0.5:{REDIS_PORT}/0"


def test_gpu_app_composes_when_the_weights_are_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    (app,) = load_yaml("config/serve.gpu.yaml")["applications"]
    registry = load_registry(app["args"]["models"])
    for spec in registry.models:
        if not spec.is_tiny:
            (tmp_path / "models" / str(spec.path)).mkdir(parents=True)
            (tmp_path / "models" / str(spec.path) / "model_index.json").write_text("{}")
    args = AppArgs.model_validate(app["args"])
    args.settings.update(model_path=str(tmp_path / "models"), cache_dir=str(tmp_path / "c"))
    _, _, served = resolve(args)
    assert [m.id for m in served] == [m.id for m in registry.models]
    # Every model's options go through Serve's own Deployment.options here.
    build_app(args)


def test_gpu_app_without_weights_needs_the_tiny_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    (app,) = load_yaml("config/serve.gpu.yaml")["applications"]
    args = AppArgs.model_validate(app["args"])
    args.settings.update(model_path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"stable-diffusion-v1\.5"):
        resolve(args)
    monkeypatch.setenv("IMAGEGEN_DEFAULT_MODEL", "tiny-sd")  # the smoke test's override
    _, _, served = resolve(args)
    assert [m.id for m in served] == ["tiny-sd"]


# --- model registries ---------------------------------------------------------------


def gpu_registry() -> Registry:
    return load_registry("config/models.gpu.yaml")


def test_gpu_registry_runs_every_real_model_on_a_gpu_in_half_precision() -> None:
    real = [m for m in gpu_registry().models if not m.is_tiny]
    assert {m.id: m.pipeline for m in real} == {
        "stable-diffusion-v1.5": "sd", "sd-1.5-inpainting": "sd", "sdxl": "sdxl",
        "sd-turbo": "sd", "flux.1-schnell": "flux", "flux.1-dev": "flux",
        "sd3.5-medium": "sd3"}
    for spec in real:
        assert spec.resources.num_gpus > 0, spec.id
        # FLUX and SD 3.5 were trained in bf16 (float16 overflows in their activations).
        expected = "bfloat16" if spec.pipeline in ("flux", "sd3") else "float16"
        assert spec.runtime.dtype == expected, spec.id
        assert spec.scaling.min_replicas == 0, spec.id


def test_gpu_registry_entries_match_their_models() -> None:
    registry = gpu_registry()
    sd15, sdxl, turbo = (registry.get(i) for i in ("stable-diffusion-v1.5", "sdxl", "sd-turbo"))
    assert sd15 is not None and sdxl is not None and turbo is not None
    inpaint = registry.get(str(sd15.inpainting_model))
    assert inpaint is not None and inpaint.type == "inpainting"
    assert sdxl.pipeline == "sdxl" and sdxl.runtime.vae_tiling
    assert (sdxl.defaults.width, sdxl.defaults.height) == (1024, 1024)
    assert turbo.type == "turbo" and turbo.resources.num_gpus == 0.5
    assert (turbo.defaults.steps, turbo.defaults.guidance_scale) == (1, 0.0)


def test_gpu_registry_keeps_the_tiny_model_for_smoke_tests_off_the_gpu() -> None:
    tiny = gpu_registry().get("tiny-sd")
    assert tiny is not None and tiny.source == "trained"
    assert tiny.resources.num_gpus == 0


@pytest.mark.parametrize("relpath", REGISTRIES)
def test_every_model_translates_to_deployment_options_serve_accepts(relpath: str) -> None:
    for spec in load_registry(relpath).models:
        options = model_options(spec)
        schema = DeploymentSchema.model_validate(options)
        # Serve ignores unknown keys at all three levels: a misspelt one would be dropped.
        assert set(options) <= set(DeploymentSchema.model_fields), spec.id
        assert set(options["autoscaling_config"]) <= set(AutoscalingConfig.model_fields), spec.id
        assert set(options["ray_actor_options"]) <= set(RayActorOptionsSchema.model_fields)
        autoscaling = AutoscalingConfig.model_validate(options["autoscaling_config"])
        assert autoscaling.min_replicas == spec.scaling.min_replicas, spec.id
        assert autoscaling.downscale_to_zero_delay_s == spec.scaling.idle_timeout_s, spec.id
        assert schema.ray_actor_options.num_gpus == spec.resources.num_gpus, spec.id
        assert schema.max_ongoing_requests == 1, spec.id  # a batch of jobs is one call


# --- KubeRay ------------------------------------------------------------------------


def test_rayservice_serves_the_same_config_as_serve_gpu_yaml() -> None:
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    gpu = ServeDeploySchema.model_validate(load_yaml("config/serve.gpu.yaml"))
    assert schema.applications == gpu.applications
    assert embedded == load_yaml("config/serve.gpu.yaml")


def test_rayservice_autoscales_zero_to_four_gpu_workers() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (0, 4)
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_rayservice_pods_run_the_image_with_weights_redis_and_the_serve_port() -> None:
    service = rayservice()
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    claims = rayservice_resources("PersistentVolumeClaim")
    redis_services = rayservice_resources("Service")
    for pod in ray_pod_specs(service):
        (container,) = pod["containers"]
        assert container["image"] == "imagegen:latest"
        # KubeRay points its serve Service and probes at the container port named serve.
        assert {"name": "serve", "containerPort": port} in container["ports"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        env = {e["name"]: e.get("value") for e in container["env"]}
        host, redis_port = str(env["IMAGEGEN_REDIS_ADDR"]).split(":")
        ports = [p["port"] for p in redis_services[host]["spec"]["ports"]]
        assert int(redis_port) in ports


def test_rayservice_secrets_come_from_a_secret_and_ray_uses_tokens() -> None:
    service = rayservice()
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    (redis,) = rayservice_resources("Deployment").values()
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" in container["args"]
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == "imagegen-secrets"
    for pod in ray_pod_specs(service):
        (ray_container,) = pod["containers"]
        env = {e["name"]: e for e in ray_container["env"]}
        assert "secretKeyRef" in env["IMAGEGEN_REDIS_PASSWORD"]["valueFrom"]
        assert "value" not in env["IMAGEGEN_REDIS_PASSWORD"]


# --- images in S3, records in a capped Redis -----------------------------------------


def test_every_node_and_the_app_name_the_images_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas write images that the ingress reads: every process of the app must name
    the same S3 store, from the node's environment, with its credentials out of the files."""
    config = cluster_config()
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        command = " ".join(start)
        export = 'export IMAGEGEN_BLOB_URL="$(cat ~/imagegen-secrets/blob-url)"'
        assert export in command and command.index(export) < command.index("ray start")
    for node in config["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"] == {"Name": "imagegen-node"}
    for relpath in ("config/serve.gpu.yaml",):
        (app,) = load_yaml(relpath)["applications"]
        monkeypatch.setenv("IMAGEGEN_BLOB_URL", "s3://my-imagegen-images/imagegen")
        env = app_settings_env(app, monkeypatch, redis_addr=f"10.0.0.5:{REDIS_PORT}")
        settings = load_settings(app["args"]["settings"], env=env)
        assert settings.blobs == "s3://my-imagegen-images/imagegen"
        text = (ROOT / relpath).read_text()
        assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()
    for pod in ray_pod_specs(rayservice()):
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["IMAGEGEN_BLOB_URL"]["valueFrom"]["secretKeyRef"]["key"] == "blob-url"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "imagegen-secrets" and ref["optional"] is True  # or IRSA


def test_redis_holds_records_only_capped_so_it_refuses_rather_than_loses() -> None:
    head_setup = " ".join(cluster_config()["head_setup_commands"])
    assert "--maxmemory 2gb --maxmemory-policy noeviction" in head_setup
    (redis,) = rayservice_resources("Deployment").values()
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    cap = int(args[args.index("--maxmemory") + 1].removesuffix("mb"))
    assert args[args.index("--appendfsync") + 1] == "always"  # an acknowledged submit is on disk
    assert "--appendonly yes --appendfsync always" in head_setup
    limit = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
    assert cap <= 0.8 * limit  # room for the AOF rewrite's fork and the allocator


def test_the_lifecycle_rule_expires_images_a_day_after_retention() -> None:
    import json

    from serve_app.settings import Settings

    (rule,) = json.loads((ROOT / "docs/s3-lifecycle.json").read_text())["Rules"]
    retention_days = Settings().retention_s / 86400
    assert rule["Status"] == "Enabled" and rule["Expiration"]["Days"] == retention_days + 1
    assert rule["Filter"]["Prefix"].endswith("jobs/")


# --- image --------------------------------------------------------------------------


def test_dockerfile_pins_cuda_torch_before_installing_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    image = dockerfile_ray_image()
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-cu12")
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d", text)
    torch_install = text.index(f'pip install --no-cache-dir "{TORCH_PIN}"')
    project_install = text.index("pip install --no-cache-dir -e .")
    assert torch_install < project_install
    assert re.search(r"^EXPOSE 3003 8265$", text, re.M)
    assert "config/serve.gpu.yaml" in text


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "models", "data"} <= ignored
    assert not {"serve_app", "deployments", "config", "pyproject.toml", "README.md"} & ignored
