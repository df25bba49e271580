"""Settings: code defaults, overridden by the serve config's `args`, then by the environment.

This is the only module that reads environment variables. Everything else receives a
`Settings` value (it crosses Ray handles as plain data, so replicas never read the
environment of whatever machine they land on).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from serve_app.credentials import ApiKey, check_unique, load_keys_file, parse_keys
from serve_app.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "imagegen" if xdg else Path.home() / ".local" / "share" / "imagegen"


class Limits(BaseModel):
    """Bounds on what a request may ask for. Checked by the ingress before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    max_images: int = 4
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    # A request body past this is refused (413) before it is read further: room for two
    # input images at max_input_bytes as base64, and the rest of the request.
    max_body_bytes: int = 64 * 1024 * 1024
    # The work one request may ask for, in megapixel-steps: width x height / 1e6 x steps x
    # numImages (1024 x 1024, 50 steps, 4 images is 210), so one request cannot hold a GPU
    # for an hour.
    max_work: float = 250.0
    # LoRAs one request may stack, and the bound on each one's |scale|.
    max_loras: int = 5
    max_lora_scale: float = 4.0
    # ControlNet conditioning scale: 0 (no effect) to this.
    max_conditioning_scale: float = 2.0
    # The largest image an upscale job may make (width x height): a 2048 x 2048 image x2.
    max_upscale_pixels: int = 4096 * 4096


class Settings(BaseModel):
    """Everything a deployment needs to know about its environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(3003, ge=1, le=65535)
    host: str = "127.0.0.1"
    max_concurrent_jobs: int = Field(4, ge=1)
    # LoRAs one replica keeps loaded per model; the least recently used goes past this.
    max_loaded_loras: int = Field(16, ge=1, le=1000)
    max_queue_size: int = Field(100, ge=1)
    job_timeout_ms: int = Field(300_000, ge=1000)
    model_path: str = "/models"
    enable_nsfw_filter: bool = False
    data_dir: str = Field(default_factory=lambda: str(_default_home() / "data"))
    cache_dir: str = Field(default_factory=lambda: str(_default_home() / "models"))
    default_model: str = "tiny-sd"
    # "sqlite" (one node, the default), "redis" (clusters) or "memory" (nothing persists).
    store: str = Field("sqlite", pattern="^(sqlite|redis|memory)$")
    redis_url: str = "redis://127.0.0.1:6379/0"
    # "fsync": a submit's save is on disk before its 202 (SQLite syncs that transaction;
    # Redis needs `appendfsync always`, as the deploy files set it). "relaxed": it is saved
    # (safe against a crash of the process) but may sit in the OS cache; a power loss may
    # lose the last second of acknowledged submits. README "Durability" has the cost.
    durability: Literal["fsync", "relaxed"] = "fsync"
    # Whether models with `runtime.device: auto` get GPUs (serve_app.placement): `auto`
    # looks for GPUs among the Ray cluster's nodes at startup; `cuda` says there are (an
    # autoscaling cluster whose GPU nodes join later); `none` keeps every model on CPUs.
    accelerator: Literal["auto", "cuda", "none"] = "auto"
    # A job whose replica died is re-run this many times in all before it fails.
    max_attempts: int = Field(3, ge=1)
    # Finished jobs (and their images) are deleted after this age or beyond this count.
    retention_s: int = Field(7 * 24 * 3600, ge=60)
    retention_max_jobs: int = Field(100_000, ge=10)
    # Where image bytes live (serve_app.blobs): file:///absolute/path (default: blobs/
    # under data_dir), s3://bucket/prefix, or memory:// (one process only). An S3 store is
    # configured by the standard AWS_* variables, which its client reads; the endpoint
    # (AWS_ENDPOINT_URL) is read here too, to allow plain http to a private endpoint.
    blob_url: str | None = None
    s3_endpoint_url: str | None = None
    # How long a presigned image URL (S3 stores, `?images=url`, OpenAI `url`) stays valid.
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # Blobs older than this with no job record (a refused submit's inputs, a replica that
    # died mid-upload) are deleted by the tracker's sweep.
    blob_sweep_grace_s: int = Field(3600, ge=60)
    limits: Limits = Limits()
    # API keys (serve_app.credentials): hashes only, from API_KEYS and/or the keys file.
    # With none, the service is open and may only listen on loopback unless
    # allow_anonymous is set.
    api_keys: tuple[ApiKey, ...] = ()
    api_keys_file: str | None = None
    allow_anonymous: bool = False
    # Token buckets per API key (per client address without keys): requests per second and
    # burst. 0 turns a limit off.
    submit_rate: float = Field(10.0, ge=0)
    submit_burst: int = Field(60, ge=1)
    read_rate: float = Field(50.0, ge=0)
    read_burst: int = Field(100, ge=1)
    # A running job's progress leaves its replica at most this often (and for its first and
    # last step): what the tracker, the store and every event stream see. 0: every step.
    progress_every_ms: int = Field(100, ge=0, le=10_000)
    # Idle worker processes per node kept ready for a model replica, its imports done
    # (deployments/warm_pool.py): a model scaled up from zero starts in ~1 s instead of
    # ~12. Each holds ~0.5 GB of host memory; 0 turns them off.
    warm_workers: int = Field(1, ge=0, le=16)
    # Jobs one key may have waiting at once (its own 429), and event streams open at once.
    max_queued_per_key: int = Field(50, ge=1)
    max_streams_per_key: int = Field(10, ge=1)
    # Webhooks (serve_app.jobs.webhooks). The Standard Webhooks signing secret: `whsec_` +
    # base64 of random bytes (24 to 64 recommended); without one, a webhook is a 400.
    # Private targets (loopback, private, link-local) only when allowed. A delivery is
    # retried with exponential backoff (base, doubling, capped) until its deadline.
    webhook_secret: SecretStr | None = None
    webhook_allow_private: bool = False
    webhook_deadline_s: int = Field(24 * 3600, ge=1)
    webhook_retry_base_s: float = Field(2.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_concurrency: int = Field(8, ge=1)

    @field_validator("webhook_secret", mode="after")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_key(value)  # raises ValueError naming what is wrong (never the secret)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        return parse_keys(value) if isinstance(value, str) else value

    @property
    def blobs(self) -> str:
        """The blob store's URL: `blob_url`, else a folder under `data_dir`."""
        return self.blob_url or Path(self.data_dir, "blobs").resolve().as_uri()

    @property
    def open(self) -> bool:
        """No API keys: every request is served, as the one anonymous caller."""
        return not self.api_keys

    def check_exposure(self, host: str) -> None:
        """Refuse to serve without API keys on anything but loopback, unless asked to."""
        if self.open and not self.allow_anonymous and not is_loopback(host):
            raise ConfigError(
                f"Refusing to serve on {host} without API keys: anyone who reaches it could "
                "read and cancel every job. Set API_KEYS (e.g. API_KEYS=alice:$(imagegen keys "
                "new --bare)) or IMAGEGEN_API_KEYS_FILE, or set ALLOW_ANONYMOUS=1 to serve "
                "openly on purpose.")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


WEBHOOK_SECRET_HELP = (
    "set WEBHOOK_SECRET to whsec_ followed by the base64 of 24 to 64 random bytes, e.g. "
    "WEBHOOK_SECRET=whsec_$(python3 -c 'import base64,secrets; "
    "print(base64.b64encode(secrets.token_bytes(32)).decode())')")


def webhook_key(secret: SecretStr) -> bytes:
    """The HMAC key inside a `whsec_` secret (Standard Webhooks); ValueError if malformed.
    Like the reference library, base64 padding is optional and any non-empty key is taken
    (the specification recommends 24 to 64 bytes)."""
    text = secret.get_secret_value().strip()
    if not text.startswith("whsec_"):
        raise ValueError("the webhook secret must start with whsec_; " + WEBHOOK_SECRET_HELP)
    encoded = text.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("the webhook secret is not valid base64 after whsec_; "
                         + WEBHOOK_SECRET_HELP) from None
    if not key:
        raise ValueError("the webhook secret is empty; " + WEBHOOK_SECRET_HELP)
    return key


# Environment variable -> settings field. The first six are the seed document's.
ENV_VARS: dict[str, str] = {
    "PORT": "port",
    "MAX_CONCURRENT_JOBS": "max_concurrent_jobs",
    "MODEL_PATH": "model_path",
    "MAX_QUEUE_SIZE": "max_queue_size",
    "JOB_TIMEOUT": "job_timeout_ms",
    "ENABLE_NSFW_FILTER": "enable_nsfw_filter",
    "IMAGEGEN_HOST": "host",
    "IMAGEGEN_DATA_DIR": "data_dir",
    "IMAGEGEN_CACHE_DIR": "cache_dir",
    "IMAGEGEN_DEFAULT_MODEL": "default_model",
    "IMAGEGEN_MAX_LOADED_LORAS": "max_loaded_loras",
    "IMAGEGEN_STORE": "store",
    "IMAGEGEN_REDIS_URL": "redis_url",
    "IMAGEGEN_DURABILITY": "durability",
    "IMAGEGEN_ACCELERATOR": "accelerator",
    "IMAGEGEN_MAX_ATTEMPTS": "max_attempts",
    "IMAGEGEN_RETENTION_S": "retention_s",
    "IMAGEGEN_RETENTION_MAX_JOBS": "retention_max_jobs",
    "IMAGEGEN_BLOB_URL": "blob_url",
    "AWS_ENDPOINT_URL": "s3_endpoint_url",
    "IMAGEGEN_PRESIGN_EXPIRY_S": "presign_expiry_s",
    "IMAGEGEN_BLOB_SWEEP_GRACE_S": "blob_sweep_grace_s",
    "API_KEYS": "api_keys",
    "IMAGEGEN_API_KEYS_FILE": "api_keys_file",
    "ALLOW_ANONYMOUS": "allow_anonymous",
    "IMAGEGEN_SUBMIT_RATE": "submit_rate",
    "IMAGEGEN_SUBMIT_BURST": "submit_burst",
    "IMAGEGEN_READ_RATE": "read_rate",
    "IMAGEGEN_READ_BURST": "read_burst",
    "IMAGEGEN_MAX_QUEUED_PER_KEY": "max_queued_per_key",
    "IMAGEGEN_MAX_STREAMS_PER_KEY": "max_streams_per_key",
    "IMAGEGEN_PROGRESS_EVERY_MS": "progress_every_ms",
    "IMAGEGEN_WARM_WORKERS": "warm_workers",
    "WEBHOOK_SECRET": "webhook_secret",
    "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE": "webhook_allow_private",
    "IMAGEGEN_WEBHOOK_DEADLINE_S": "webhook_deadline_s",
}


def load_settings(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then `overrides` (the serve config's args), then environment variables."""
    env = os.environ if env is None else env
    values: dict[str, Any] = dict(overrides or {})
    for var, field in ENV_VARS.items():
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[field] = raw.strip()
    try:
        settings = Settings.model_validate(values)
        if settings.api_keys_file:
            keys = [*settings.api_keys, *load_keys_file(settings.api_keys_file)]
            settings = settings.model_copy(update={"api_keys": tuple(check_unique(keys))})
        else:
            check_unique(list(settings.api_keys))
        return settings
    except ValueError as exc:
        if not isinstance(exc, ValidationError):
            raise ConfigError(f"Invalid settings: {exc}") from None
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            var = next((v for v, f in ENV_VARS.items() if f == field), None)
            where = f"{field} (environment variable {var})" if var and var in env else field
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError("Invalid settings: " + "; ".join(problems)) from None
