"""How a model's replicas run: Ray Serve scaling, Ray resources and the pipeline's runtime
knobs, as one registry entry (or pool) states them. Torch-free: the builder, the tracker's
lanes and the replica read them alike; `serve_app.registry` holds the entries themselves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scaling(Strict):
    """Per-model replica scaling, translated to Ray Serve's `autoscaling_config`."""

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(1.0, gt=0)
    # Seconds a model sits idle before its last replica goes away (scale to zero).
    idle_timeout_s: float = Field(300.0, ge=0)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # How often load is reported and over what window it is averaged. Serve's defaults
    # (10 s, 30 s) leave a cold model waiting ~10 s before a replica is even asked for.
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)
    # Jobs one replica runs at once; more run as one batched pipeline call.
    max_batch_size: int = Field(1, ge=1, le=64)
    # A job that finds a replica free waits up to this long (and at most 5% of its own
    # expected run time) for compatible jobs to share its call; 0 sends it at once.
    max_batch_wait_s: float = Field(0.05, ge=0, le=5)
    # A downscale waits this long for the running job before killing the replica.
    graceful_shutdown_timeout_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def autoscaling_config(self) -> dict[str, Any]:
        initial = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": initial,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.idle_timeout_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }


class Resources(Strict):
    """Per-replica resources, passed to Ray as `ray_actor_options`."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb is not None:
            options["memory"] = int(self.memory_gb * 1024**3)
        return options


class StepCacheSpec(Strict):
    """`runtime.step_cache` (serve_app.generation.step_cache): reuse deep features across
    denoising steps. Faster, slightly different images (bench/stepcache.py measures both)."""

    # deepcache: UNet models (SD 1.x, SDXL). taylorseer: FLUX, SD 3. first_block: FLUX.
    kind: Literal["deepcache", "taylorseer", "first_block"]
    # deepcache, taylorseer: a full step every `every` steps.
    every: int = Field(3, ge=2, le=10)
    # first_block: reuse when the first block's output changed by less than this (relative).
    threshold: float = Field(0.1, gt=0, le=1)


class Runtime(Strict):
    """How the replica loads and runs the pipeline (CUDA knobs are ignored on a CPU)."""

    # `auto`: decided at startup for the cluster (serve_app.placement): a GPU where there
    # is one, else the CPU if the model's default job fits JOB_TIMEOUT there.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # `auto`: float32 on a CPU; on a GPU the half precision the family wants (fp16 for
    # SD 1.x/SDXL, bf16 for FLUX/SD 3).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    channels_last: bool = False
    # torch.compile the denoiser (CUDA). Its compiled artifacts are saved under the cache
    # dir and loaded by the next replica, so a scale-up from zero does not recompile.
    compile: bool = False
    # One matmul for each attention's q, k and v (diffusers' fuse_qkv_projections): fewer,
    # larger GEMMs; the same image up to rounding. Not with LoRAs (PEFT targets to_q/k/v).
    fuse_qkv: bool = False
    # Which fused attention kernels SDPA may use on CUDA (`auto`: torch chooses).
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    # Denoiser weight quantization through torchao: int8 weights (any device), int8
    # weights and activations, fp8 (CUDA, compute capability 8.9+). Less memory, faster
    # GEMMs where the hardware has them; the image changes slightly (bench/stepcache.py's
    # quality grid measures it). Batch invariance on a CPU needs plain linear layers:
    # quantize there only with batch_invariant: false.
    quantize: Literal["none", "int8_weight_only", "int8_dynamic", "fp8"] = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    attention_slicing: bool = False
    # CUDA only: keep the weights in CPU memory and move each model (`model`: the text
    # encoders, the denoiser, the VAE in turn) or each layer (`sequential`: slowest, least
    # GPU memory) onto the GPU while it runs. docs/models.md says what each saves.
    cpu_offload: Literal["none", "model", "sequential"] = "none"
    step_cache: StepCacheSpec | None = None
    # Batched images byte-identical to the same seeds made alone (batch-invariant layers on
    # a CPU, per-image denoiser sub-batches elsewhere). `auto`: on on a CPU (free there),
    # off on an accelerator, where it would cost a forward per image (serve_app.generation.
    # batching says what off trades).
    batch_invariant: bool | Literal["auto"] = "auto"
    # `source: null` only: how long each pretend denoising step takes, and how many bytes
    # each image it answers has (0: a 1x1 PNG; ~400 KB is a 512² photo's, ~1.5 MB 1024²).
    null_step_ms: float = Field(0.0, ge=0, le=10_000)
    null_image_bytes: int = Field(0, ge=0, le=64 * 1024 * 1024)

    def invariant_on(self, device: str) -> bool:
        """Whether batches are made byte-identical to lone calls on `device`."""
        if self.batch_invariant == "auto":
            return device == "cpu"
        return bool(self.batch_invariant)
