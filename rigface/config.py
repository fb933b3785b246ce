"""One typed config for every job: YAML files, then environment, then command-line overrides.

Precedence (last wins): defaults < YAML files (in the order given) < ``RIGFACE__SECTION__FIELD`` env vars
< ``section.field=value`` overrides. Values from env and overrides are parsed as YAML scalars, so
``train.lr=1e-4`` is a float and ``prepare.splits={train: 0.9, val: 0.1}`` a mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rigface.face.config import FaceConfig
from rigface.model.config import ModelConfig

ENV_PREFIX = "RIGFACE__"


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageConfig(_Section):
    # Where the local stack keeps its state (pids, env file, S3 data, MLflow sqlite).
    state_dir: str = ".rigface"
    # Bucket for shards, checkpoints and MLflow artifacts on the local stack.
    bucket: str = "rigface"
    # Endpoint of an S3-compatible store; None means AWS's own or AWS_ENDPOINT_URL from the environment.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    retry_seconds: float = Field(120.0, gt=0, description="how long a storage call retries transient S3 errors")
    mlflow_tracking_uri: str | None = None

    def export_env(self, environ: dict[str, str] | None = None) -> None:
        """Hand the configured endpoints to boto3, pyarrow and MLflow, where the environment names none."""
        environ = os.environ if environ is None else environ
        pairs = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "RIGFACE_S3_RETRY_SECONDS": str(self.retry_seconds),
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
        }
        for key, value in pairs.items():
            if value is not None and not environ.get(key):
                environ[key] = value
        if self.endpoint_url and not environ.get("MLFLOW_S3_ENDPOINT_URL"):
            environ["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url


class ReaderConfig(_Section):
    """Size limits of every shard read (train, evaluate, validate, preview): checked before allocating."""

    max_member_bytes: int = Field(64 << 20, ge=1024, description="largest tar member read into memory")
    max_sample_bytes: int = Field(256 << 20, ge=1024, description="largest sum of one sample's members")
    max_image_pixels: int = Field(4096 * 4096, ge=256, description="largest image decoded (width x height)")
    max_npy_bytes: int = Field(1 << 20, ge=64, description="largest array an .npy member may declare")


class PrepareConfig(_Section):
    source: str | None = None
    output: str | None = None
    pairs_per_video: int = Field(8, ge=1)
    max_pairs_per_video: int = Field(64, ge=1)
    min_gap_seconds: float = Field(1.0, ge=0.0)
    shard_size: int = Field(64, ge=1, description="samples per shard")
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of videos in the val split")
    jpeg_quality: int = Field(95, ge=50, le=100)
    max_frame_side: int = Field(4096, ge=64, description="frames larger than this are downscaled first")
    face_probe_every_seconds: float = Field(
        0.5, ge=0.0, description="before choosing pairs, look for a face every this many seconds (0: off) and "
        "draw pairs only where one shows")
    face_probe_max: int = Field(64, ge=2, description="most frames probed per video (the stride widens beyond)")
    face_probe_side: int = Field(640, ge=64, description="probe frames are downscaled to this longer side")
    # Bounds (Ray's own defaults are unlimited): see pipelines/guarded.py and docs/cluster.md.
    max_retries: int = Field(2, ge=0, description="a video whose worker process dies is tried again this many "
                             "times, then recorded as a 'crashed' skip; also Ray's retries of a lost task")
    max_actor_restarts: int = Field(3, ge=0, description="restarts of a lost face actor (and of its task)")
    video_timeout_s: float = Field(600.0, gt=0.0, description="per video and stage; past it: a 'timeout' skip")
    max_video_bytes: int = Field(16 << 30, ge=1, description="larger sources are a 'too_large' skip")
    stall_timeout_s: float = Field(1800.0, gt=0.0, description="the job fails when no stage progresses this long")
    lease_seconds: float = Field(120.0, gt=1.0, description="a killed run's lease on the output expires after this")


class ResourcesConfig(_Section):
    """What the jobs may use, in one place: GPUs, and how prepare's face pool shares the cores.

    On CPUs, prepare runs one pool of actors that each take whole videos (decode, face analysis, encoding), one per
    face_actor_cpus cores Ray reports; with GPUs, face actors share each GPU (face_actor_gpus) and decode and
    encode run as CPU tasks (task_cpus each) on the reserve_cpus they leave. The pool starts at the size the
    resources hold now and grows to face_actors_max: on an autoscaling cluster, whose nodes may not exist yet,
    set face_actors_max (and gpus: on).
    """

    gpus: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: use GPUs when Ray reports any now; on: request them even at zero (autoscaling "
        "GPU nodes); off: never. Drives prepare's face actors, train workers and evaluate's editing actors")
    face_layout: Literal["auto", "fused", "staged"] = Field(
        "auto", description="fused: each face actor takes whole videos (decode, analysis, encoding); staged: CPU "
        "decode / encode tasks around the face actors; auto: fused on CPUs, staged when GPUs are used")
    face_actors_min: int | None = Field(None, ge=1, description="None: the pool the resources Ray reports hold now")
    face_actors_max: int | None = Field(None, ge=1, description="None: sized from the resources Ray reports")
    face_actor_cpus: float = Field(1.0, gt=0.0, description="cores one busy face actor uses; its logical CPU "
                                   "share is fitted so the sized pool fills the CPUs (after reserve_cpus with GPUs)")
    face_actor_gpus: float = Field(0.25, gt=0.0, le=1.0, description="GPU share per face actor when GPUs are used")
    task_cpus: float = Field(0.25, gt=0.0, description="logical CPUs per decode / encode task (GPU layout)")
    reserve_cpus: float = Field(0.5, ge=0.0, description="CPUs the GPU face actors leave to decode / encode tasks")

    @field_validator("gpus", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:  # YAML reads a bare on/off (and true/false) as booleans
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class TrainConfig(_Section):
    data: str | None = None
    min_quality: float | None = Field(
        None, ge=0.0, le=1.0, description="drop training pairs whose meta.json quality score is below this")
    quality_filters: list[str] = Field(
        default_factory=list, description="more pair filters by name, e.g. ['sharpness>=80', 'padded_fraction<=0.1']")

    @field_validator("quality_filters")
    @classmethod
    def _known_quality_filters(cls, v: list[str]) -> list[str]:
        from rigface.data.quality import parse_filter

        for expr in v:
            parse_filter(expr)  # a ValueError names the bad expression and the known fields
        return v
    run_name: str = "rigface"
    experiment: str = "rigface"
    storage_path: str | None = None
    num_workers: int = Field(1, ge=1, description="one GPU each when resources.gpus says GPUs are used")
    batch_size: int = Field(4, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-2, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_steps: int = Field(100_000, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    image_every: int = Field(1000, ge=1)
    max_failures: int = Field(3, ge=0)
    max_nonfinite_steps: int = Field(20, ge=1, description="this many non-finite steps in a row end the run FAILED")
    seed: int = 0
    register_model: str | None = None
    val_batch_size: int = Field(4, ge=1, description="fixed validation pairs drawn in the MLflow image grids")
    val_inference_steps: int = Field(20, ge=1, description="denoising steps for the validation grids")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: max(2, num_workers))")
    loader_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    latent_cache: bool = Field(True, description="use `rigface latents` sidecars made by this model's VAE, "
                                                 "when every train shard has one; else encode with the VAE")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: full replicas; fsdp: parameters, "
                                              "gradients and optimizer state sharded over the workers (FSDP2)")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit: bitsandbytes' 8-bit "
                                                     "AdamW state (2 bytes per parameter instead of 8)")


class LatentsConfig(_Section):
    """`rigface latents`: the frozen VAE's latents of every shard, written beside it."""

    data: str | None = None
    num_actors: int = Field(1, ge=1, description="encoding actors (one GPU each where resources.gpus uses them)")
    actor_cpus: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="images per VAE call are 4x this")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of the latents")
    overwrite: bool = False
    max_actor_restarts: int = Field(3, ge=0, description="restarts of a lost encoding actor (and of its shard)")
    stall_timeout_s: float = Field(1800.0, gt=0.0, description="the job fails when no shard finishes this long")


class EvaluateConfig(_Section):
    data: str | None = None
    model: str | None = None
    out: str | None = None
    split: str = "val"
    num_inference_steps: int = Field(50, ge=1)
    batch_size: int = Field(4, ge=1)
    max_samples: int | None = Field(None, ge=1)
    lpips_net: Literal["alex", "vgg"] = "alex"
    mlflow_run_id: str | None = None
    num_actors: int = Field(1, ge=1, description="editing actors (one GPU each when resources.gpus says so)")
    actor_cpus: float = Field(0.5, gt=0.0)
    seed: int = 0
    # Edit and evaluate: the authors sampled in fp32; bf16/fp16 are faster on GPUs and drift slightly from it.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # A diffusers scheduler class (e.g. DDIMScheduler) built from the model's scheduler config; None: the model's
    # own (the authors' UniPC schedule for models saved by rigface).
    scheduler: str | None = Field(None, pattern=r"^[A-Za-z0-9]+Scheduler$")
    max_retries: int = Field(2, ge=0, description="Ray retries of a lost read task")
    max_actor_restarts: int = Field(3, ge=0, description="restarts of a lost editing actor (and of its batch)")
    channels_last: bool = Field(True, description="channels-last weights for editing on GPUs")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = Field(
        False, description="torch.compile the Denoising UNet for editing (slow first call): true or a torch.compile "
                           "mode; 'reduce-overhead' (CUDA graphs) is the fastest for batch-1 edits on GPUs")
    stall_timeout_s: float = Field(1800.0, gt=0.0, description="the job fails when no stage progresses this long")

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


class DemoConfig(_Section):
    """`make demo`'s own knobs: the sample videos it makes and the edit it shows."""

    prefix: str = "demo"
    n_videos: int = Field(9, ge=2)
    val_videos: int = Field(3, ge=1)
    seconds: float = Field(4.0, gt=0)
    fps: int = Field(8, ge=1)
    size: int = Field(256, ge=64)
    edit: Literal["expression", "pose", "lighting", "all"] = "pose"
    source: str = "astronaut"
    driver: str = "grace_hopper"


class RigFaceConfig(_Section):
    storage: StorageConfig = StorageConfig()
    resources: ResourcesConfig = ResourcesConfig()
    face: FaceConfig = FaceConfig()
    prepare: PrepareConfig = PrepareConfig()
    reader: ReaderConfig = ReaderConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    latents: LatentsConfig = LatentsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    demo: DemoConfig = DemoConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, for MLflow params (no secrets live in the config)."""
        return dict(_flatten(self.model_dump(mode="json")))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {dotted!r}: expected section.field=value")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, _, raw = item.partition("=")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    return tree


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _parse_scalar(raw))
    return tree


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    # A file may name other files to build on, relative to itself: `include: [model/tiny.yaml]`.
    merged: dict[str, Any] = {}
    for inc in data.pop("include", None) or []:
        _deep_merge(merged, read_yaml(path.parent / inc))
    return _deep_merge(merged, data)


def validate(tree: Mapping[str, Any]) -> RigFaceConfig:
    try:
        return RigFaceConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def load_config(
    files: Iterable[str | os.PathLike[str]] = (),
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RigFaceConfig:
    """Build the config from YAML files, RIGFACE__* env vars and dotted overrides, in that order."""
    tree: dict[str, Any] = {}
    for f in files:
        _deep_merge(tree, read_yaml(f))
    _deep_merge(tree, env_overrides(environ))
    _deep_merge(tree, parse_overrides(overrides))
    return validate(tree)
