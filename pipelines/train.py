"""`rigface train`: Ray Train (V2 API) fine-tunes the RigFace dual UNet from WebDataset shards.

The driver (``run_train``) lists the shards, finds or creates the MLflow run for the run name, logs the
params, and starts a ``TorchTrainer`` whose checkpoints go to ``{storage_path}/{run_name}/`` (S3 on the
local stack). ``train_func`` runs on every worker, top to bottom: build the model, restore the latest
checkpoint if any, stream this rank's shards, and train for ``max_steps`` optimizer steps. Rank 0 logs
metrics, validation grids and checkpoint URIs to MLflow and, at the end, the model folder (registered when
``train.register_model`` names a model). A rerun with the same run name resumes from the latest checkpoint:
Ray Train V2 finds the run's checkpoint snapshot in storage, and the MLflow run is found again by tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from rigface.config import RigFaceConfig
from rigface.data import storage

from pipelines import train_tracking as tracking
from pipelines.ray_env import ensure_ray, forwarded_env
from pipelines.resources import use_gpus

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MODEL_DIR = "model"


class TrainError(RuntimeError):
    """The training job cannot start or did not finish (bad input, no data, a run that failed)."""


@dataclasses.dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str | None
    resumed: bool
    steps: int
    checkpoint_uri: str | None
    storage_uri: str
    metrics: dict[str, Any]
    model_uri: str | None = None


# ---------------------------------------------------------------- driver


def storage_location(cfg: RigFaceConfig) -> tuple[str, Any, str]:
    """(storage URI, pyarrow filesystem or None, path for RunConfig): S3 on the local stack by default."""
    uri = cfg.train.storage_path
    if uri is None:
        if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
            uri = f"s3://{cfg.storage.bucket}/runs"
        else:
            uri = str(Path(cfg.storage.state_dir, "runs").resolve())
    uri = uri.rstrip("/")
    if storage.parse_url(uri).scheme == "s3":
        fs, path = storage.pyarrow_filesystem(uri)
        return uri, fs, path
    Path(uri).mkdir(parents=True, exist_ok=True)
    return uri, None, uri


def run_train(cfg: RigFaceConfig, *, data: str | None = None, run_name: str | None = None,
              max_steps: int | None = None, num_workers: int | None = None) -> TrainResult:
    """Train (or resume) the run ``run_name`` on the shards under ``data``; blocks until it ends."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train_data import TrainDataError, check_enough, list_shards, shards_for_split
    from rigface.data.dataset import Dataset, ReadLimits

    updates = {k: v for k, v in {"data": data, "run_name": run_name, "max_steps": max_steps,
                                 "num_workers": num_workers}.items() if v is not None}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})
    tc = cfg.train
    if not tc.data:
        raise TrainError("no training data: pass --data URL or set train.data")
    limits = ReadLimits.from_config(cfg.reader)
    try:
        all_shards = list_shards(tc.data, limits)
    except Exception as exc:  # noqa: BLE001 - a missing bucket/prefix is bad input, not a crash
        raise TrainError(f"cannot list shards under {tc.data}: {exc}") from exc
    train_shards = shards_for_split(all_shards, "train")
    val_shards = shards_for_split(all_shards, "val")
    val_split: str | None = "val"
    if not val_shards or val_shards == train_shards:  # no val split: preview on train pairs
        val_shards, val_split = train_shards, None
    if not train_shards:
        raise TrainError(f"no train shards under {tc.data}")
    # Deterministic data faults stop here, before Ray Train (which would retry them max_failures times).
    try:
        check_enough(train_shards, world=tc.num_workers, batch_size=tc.batch_size)
    except TrainDataError as exc:
        raise TrainError(str(exc)) from exc
    card = Dataset(tc.data).read_card() or {}
    latent_tags = sorted(_complete_latent_tags(tc.data, [u for u, _ in train_shards])) if tc.latent_cache else []
    storage_uri, fs, storage_path = storage_location(cfg)

    mlflow_client = tracking.client(cfg.storage.mlflow_tracking_uri)
    run_id, resumed = tracking.find_or_create_run(mlflow_client, tc.experiment, tc.run_name)
    params = tracking.safe_params(cfg.flat())
    params.update({"data.url": tc.data, "data.num_shards": str(len(train_shards)),
                   "data.content_hash": str(card.get("content_hash", "unknown"))})
    tracking.log_params_once(mlflow_client, run_id, params)
    for k, v in {**tracking.code_version(), "rigface.storage_uri": f"{storage_uri}/{tc.run_name}"}.items():
        mlflow_client.set_tag(run_id, k, v)
    if card and not resumed:
        mlflow_client.log_dict(run_id, card, "dataset/dataset.json")
    log.info("train: run %s (mlflow %s, %s) on %d shard(s)", tc.run_name, run_id,
             "resuming" if resumed else "new", len(train_shards))

    ensure_ray(num_cpus=tc.ray_num_cpus or max(2, tc.num_workers))
    use_gpu = use_gpus(cfg.resources, ray.cluster_resources().get("GPU", 0))
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "train_shards": train_shards,
                           "val_shards": val_shards, "val_split": val_split, "mlflow_run_id": run_id,
                           "checkpoint_root": f"{storage_uri}/{tc.run_name}", "latent_tags": latent_tags},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=tc.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise TrainError(f"training run {tc.run_name} failed: {exc}") from exc
    metrics = dict(result.metrics or {})
    if result.error is not None:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise TrainError(f"training run {tc.run_name} failed: {result.error}")
    mlflow_client.set_terminated(run_id, status="FINISHED")
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = f"{storage_uri}/{tc.run_name}/{Path(result.checkpoint.path).name}"
    run = mlflow_client.get_run(run_id)
    return TrainResult(run_name=tc.run_name, mlflow_run_id=run_id, resumed=resumed,
                       steps=int(metrics.get("step", 0)), checkpoint_uri=checkpoint_uri,
                       storage_uri=f"{storage_uri}/{tc.run_name}", metrics=metrics,
                       model_uri=run.data.tags.get("rigface.model_uri"))


# ---------------------------------------------------------------- worker


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker. Reads top to bottom like a plain training script."""
    import ray.train
    import ray.train.torch
    import torch

    from pipelines.train_data import fixed_batch, infinite_batches
    from pipelines.train_strategy import Strategy, check_options, make_optimizer
    from rigface.data.dataset import ReadLimits
    from rigface.model import build_rigface, training_step

    cfg = RigFaceConfig.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(tc.seed + rank)

    # -- model, optimizer, schedule (trainable weights stay fp32; autocast does bf16 math on GPUs)
    check_options(tc.strategy, tc.optimizer, tc.ema_decay is not None)
    components = build_rigface(cfg.model)
    model = components.model.to(device)
    components = dataclasses.replace(components, model=model, vae=components.vae.to(device).requires_grad_(False),
                                     text_embedding=components.text_embedding.to(device))
    if tc.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    # DDP replicas or FSDP2 shards; the optimizer is made after sharding (it must see the shards).
    strategy = Strategy(tc.strategy, model, device, world, tc.mixed_precision)
    train_model = strategy.wrap()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = _lr_schedule(optimizer, tc.warmup_steps)
    ema = _ema(model, tc.ema_decay)

    # -- resume: weights, optimizer, schedule, EMA and the step count from the latest checkpoint
    step, epoch = _restore(ray.train.get_checkpoint(), strategy, optimizer, scheduler, ema)
    if step >= tc.max_steps:
        log.info("train: checkpoint at step %d already meets max_steps=%d", step, tc.max_steps)
        return
    step_components = dataclasses.replace(components, model=train_model)

    latents_tag = _latents_tag(components, cfg, config.get("latent_tags") or [])
    tracker = _RankZeroTracker(config["mlflow_run_id"], cfg) if rank == 0 else None
    if tracker is not None:
        tracker.client.set_tag(tracker.run_id, "rigface.latent_cache", latents_tag or "none")
    limits = ReadLimits.from_config(cfg.reader)
    val_batch = fixed_batch(config["val_shards"], n=tc.val_batch_size, resolution=cfg.model.resolution,
                            split=config["val_split"], limits=limits) if rank == 0 else None
    batches = infinite_batches(config["train_shards"], start_epoch=epoch, rank=rank, world=world, seed=tc.seed,
                               batch_size=tc.batch_size, resolution=cfg.model.resolution,
                               loader_workers=tc.loader_workers, shuffle_buffer=tc.shuffle_buffer, split="train",
                               min_quality=tc.min_quality, quality_filters=tuple(tc.quality_filters),
                               latents_tag=latents_tag, limits=limits)
    autocast = _autocast(device, tc.mixed_precision)
    generator = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank + step)
    fault = _FaultInjection.from_env(rank)
    last_ckpt_step = step

    # -- the loop: one optimizer step per iteration, grad_accum micro-batches each
    model.train()
    while step < tc.max_steps:
        t_step = time.perf_counter()
        data_wait, loss_sum, skipped = 0.0, 0.0, False
        for micro in range(tc.grad_accum):
            t_data = time.perf_counter()
            epoch, batch = next(batches)
            data_wait += time.perf_counter() - t_data
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            sync = strategy.no_sync(last_micro=micro == tc.grad_accum - 1)
            with sync:
                with autocast:
                    loss = training_step(step_components, batch, generator=generator)
                loss_value, any_bad = _all_ranks_loss(loss.detach().float(), world)
                if any_bad:  # NaN/inf on some rank: no rank trains on this step
                    skipped = True
                    break
                (loss / tc.grad_accum).backward()
                loss_sum += loss_value
        grad_norm = float("nan")
        if not skipped:
            grad_norm = strategy.clip_grad_norm(params, tc.max_grad_norm)
            skipped = not math.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        step += 1
        fault.maybe_crash(step)
        step_time = time.perf_counter() - t_step

        if tracker is not None:
            metrics = {"lr": scheduler.get_last_lr()[0], "step_time_s": step_time, "data_wait_s": data_wait,
                       "data_wait_share": data_wait / max(step_time, 1e-9), "epoch": epoch,
                       "samples_per_s": tc.batch_size * tc.grad_accum * world / max(step_time, 1e-9),
                       "skipped_nonfinite": float(skipped)}
            if not skipped:
                metrics.update(loss=loss_sum / tc.grad_accum, grad_norm=grad_norm)
            else:
                log.warning("train: step %d skipped: non-finite loss or gradient", step)
            if device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracker.metrics.add(step, metrics)
            if step % tc.log_every == 0:
                tracker.metrics.flush()
            if val_batch is not None and strategy.name == "ddp" and (step % tc.image_every == 0
                                                                       or step == tc.max_steps):
                tracker.log_grid(components, val_batch, step)  # fsdp: rank 0 alone cannot run sharded layers

        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            _save_checkpoint(step, epoch, strategy, optimizer, scheduler, ema, config, tracker,
                             {"step": step, "epoch": epoch, **({"loss": loss_sum / tc.grad_accum} if not skipped else {})})
            last_ckpt_step = step

    final = model
    if strategy.name == "fsdp":  # every rank gathers; rank 0 alone gets (and saves) the full weights
        full_state = strategy.full_model_state()
        final = strategy.unsharded_copy(full_state) if tracker is not None else None
    if tracker is not None:
        tracker.metrics.flush()
        tracker.log_final_model(components, final, ema, tc.register_model)
    log.info("train: rank %d done at step %d (last checkpoint %d)", rank, step, last_ckpt_step)


# ---------------------------------------------------------------- pieces of train_func


def _complete_latent_tags(data_url: str, train_shards: list[str]) -> set[str]:
    """Latent caches (VAE identity + resolution) that cover every train shard; which one fits is decided on
    the workers, which hold the model's VAE."""
    from rigface.data import latents as cache

    try:
        return cache.complete_tags(train_shards, storage.list_urls(data_url))
    except Exception as exc:  # noqa: BLE001 - no cache is never fatal: training encodes with the VAE
        log.warning("train: cannot list latent sidecars under %s: %s", data_url, exc)
        return set()


def _latents_tag(components, cfg: RigFaceConfig, complete: list[str]) -> str | None:
    """This model's cache tag when a complete cache made by its own VAE exists, else None (the VAE encodes)."""
    if not complete:
        return None
    from rigface.data import latents as cache

    tag = cache.cache_tag(cache.vae_identity(components.vae), cfg.model.resolution)
    if tag in complete:
        log.info("train: using cached latents %s", tag)
        return tag
    log.warning("train: latent caches %s were made by another VAE or resolution (this model: %s); "
                "encoding with the VAE", complete, tag)
    return None


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_schedule(optimizer, warmup_steps: int):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if warmup_steps > 0 else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps)


def _ema(model, decay: float | None):
    if decay is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay)


def _autocast(device, mixed_precision: str):
    import torch

    # bf16/fp16 autocast on GPUs only: on CPU it is slower than fp32 and the tiny model does not need it.
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _all_ranks_loss(loss, world: int) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank saw a non-finite loss): one small all-reduce."""
    import torch

    bad = not bool(torch.isfinite(loss))
    if world == 1:
        return (float("nan") if bad else float(loss)), bad
    import torch.distributed as dist

    t = torch.tensor([0.0 if bad else float(loss), float(bad)], device=loss.device)
    dist.all_reduce(t)
    return float(t[0]) / world, bool(t[1] > 0)


def _restore(checkpoint, strategy, optimizer, scheduler, ema) -> tuple[int, int]:
    """Load the latest checkpoint into the live objects; (step, next epoch), or (0, 0) on a fresh run."""
    import torch

    if checkpoint is None:
        return 0, 0
    model = strategy.model
    with checkpoint.as_directory() as d:
        loaded = strategy.model_class.from_pretrained(os.path.join(d, MODEL_DIR))
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    saved_by = state.get("strategy", "ddp")
    if saved_by != strategy.name:
        raise TrainError(f"the run's checkpoint was written by train.strategy={saved_by}; resume it with that")
    strategy.load_full_state(loaded.state_dict(), optimizer, state["optimizer"])
    del loaded
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
        ema.to(next(model.parameters()).device)
    log.info("train: resumed from step %d", state["step"])
    # A resumed run starts a fresh epoch: the data position inside an epoch is not kept.
    return int(state["step"]), int(state["epoch"]) + 1


def _save_checkpoint(step, epoch, strategy, optimizer, scheduler, ema, config, tracker, metrics) -> None:
    """Rank 0 writes the model (save_pretrained, safetensors) and the training state; every rank reports (and,
    under fsdp, takes part in gathering the full state first)."""
    import ray.train
    import torch

    name = f"checkpoint_{step:08d}"
    sharded = strategy.name == "fsdp"
    model_state = strategy.full_model_state() if sharded else None
    optimizer_state = strategy.full_optimizer_state(optimizer)
    with tempfile.TemporaryDirectory(prefix="rigface-ckpt-") as d:
        checkpoint = None
        if tracker is not None:
            model = strategy.unsharded_copy(model_state) if sharded else strategy.model
            model.save_pretrained(os.path.join(d, MODEL_DIR), safe_serialization=True)
            torch.save({"step": step, "epoch": epoch, "optimizer": optimizer_state, "strategy": strategy.name,
                        "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "mlflow_run_id": config["mlflow_run_id"]}, os.path.join(d, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if tracker is not None:
        uri = f"{config['checkpoint_root']}/{name}"
        tracker.client.set_tag(tracker.run_id, "rigface.checkpoint.latest", uri)
        tracker.client.set_tag(tracker.run_id, f"rigface.checkpoint.step_{step:08d}", uri)


class _RankZeroTracker:
    """Rank 0's MLflow handle: buffered metrics, validation grids, the final model."""

    def __init__(self, run_id: str, cfg: RigFaceConfig):
        self.client = tracking.client(cfg.storage.mlflow_tracking_uri)
        self.run_id = run_id
        self.cfg = cfg
        self.metrics = tracking.MetricBuffer(self.client, run_id)

    def log_grid(self, components, batch, step: int) -> None:
        """Rows of source | render | background | target | edit on the fixed validation batch."""
        import numpy as np
        import torch

        from pipelines.train_data import image_from_chw
        from rigface.model import RigFacePipeline

        model = components.model
        was_training = model.training
        try:
            model.eval()
            pipe = RigFacePipeline.from_components(components)
            as_u8 = {k: np.stack([image_from_chw(x) for x in batch[k]]) for k in ("source", "render", "background")}
            with torch.no_grad():
                out = pipe(source=as_u8["source"], background=as_u8["background"], render=as_u8["render"],
                           expression=batch["expression"].to(next(model.parameters()).device),
                           num_inference_steps=self.cfg.train.val_inference_steps,
                           generator=torch.Generator().manual_seed(0), output_type="np")
            edits = np.asarray(getattr(out, "images", out))  # uint8 (N, H, W, 3)
            rows = [np.concatenate([as_u8["source"][i], as_u8["render"][i], as_u8["background"][i],
                                    image_from_chw(batch["target"][i]), edits[i]], axis=1)
                    for i in range(len(edits))]
            self.client.log_image(self.run_id, np.concatenate(rows, axis=0), artifact_file=f"val/step_{step:08d}.png")
        except Exception as exc:  # noqa: BLE001 - a failed preview must not kill the run
            log.warning("train: validation grid at step %d failed: %s", step, exc)
        finally:
            model.train(was_training)

    def log_final_model(self, components, model, ema, register_name: str | None) -> None:
        """The trained model folder (EMA weights when EMA is on) as the run's 'model' artifact."""
        from rigface.model import save_rigface

        if ema is not None:
            ema.copy_to(model.parameters())
        with tempfile.TemporaryDirectory(prefix="rigface-model-") as d:
            folder = os.path.join(d, "model")
            save_rigface(dataclasses.replace(components, model=model), folder)
            self.client.log_artifacts(self.run_id, folder, artifact_path="model")
        model_uri = f"runs:/{self.run_id}/model"
        if register_name:
            model_uri = tracking.register_model(self.client, self.run_id, register_name)
        self.client.set_tag(self.run_id, "rigface.model_uri", model_uri)


@dataclasses.dataclass
class _FaultInjection:
    """For the fault-tolerance test: ``RIGFACE_TRAIN_FAULT=rank=1,step=3,marker=/tmp/x`` makes that rank
    exit hard at that step, once (the marker file records that it happened)."""

    rank: int = -1
    step: int = -1
    marker: str = ""

    @classmethod
    def from_env(cls, rank: int) -> "_FaultInjection":
        spec = os.environ.get("RIGFACE_TRAIN_FAULT", "")
        if not spec:
            return cls()
        fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
        want = cls(int(fields.get("rank", -1)), int(fields.get("step", -1)), fields.get("marker", ""))
        return want if want.rank == rank and want.marker else cls()

    def maybe_crash(self, step: int) -> None:
        if step == self.step and self.marker and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed at step {step}\n")
            log.warning("train: fault injection: worker exits at step %d", step)
            os._exit(17)
