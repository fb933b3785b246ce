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
from rigface.redact import install_log_redaction, redact

from pipelines import train_tracking as tracking
from pipelines.ray_env import ensure_ray, forwarded_env
from pipelines.resources import use_gpus

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
# What retention leaves of a pruned checkpoint: Ray's run snapshot lists every checkpoint ever reported, and a
# rerun under the same name refuses to start when one of their folders is gone ("a reference to a checkpoint
# that does not exist anymore": always so on AWS S3, by timing on SeaweedFS). The folder stays, with this alone.
PRUNED_FILE = "PRUNED"
MODEL_DIR = "model"
STOP_FILE = "STOP"  # under the run's storage folder: the driver asks the workers to checkpoint and stop
# Under the run's storage folder too: a rank that hit a deterministic data error leaves its reason here, so the
# attempt Ray Train starts after it (it retries every worker error) returns at once instead of failing again.
DATA_ERROR_FILE = "DATA_ERROR"
DATA_ERROR_REASON = "data error"
CHECKPOINT_PREFIX = "checkpoint_"
FAILURE_TAG = "rigface.failure"
NONFINITE_REASON = "non-finite steps"


class TrainInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the workers wrote a last checkpoint and the MLflow run is KILLED; a rerun resumes."""


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

    install_log_redaction()
    mlflow_client = tracking.client(cfg.storage.mlflow_tracking_uri)
    run_id, resumed = tracking.find_or_create_run(mlflow_client, tc.experiment, tc.run_name)
    params = tracking.safe_params(cfg.flat())
    params.update({"data.url": redact(tc.data), "data.num_shards": str(len(train_shards)),
                   "data.content_hash": str(card.get("content_hash", "unknown"))})
    tracking.log_params_once(mlflow_client, run_id, params)
    for k, v in {**tracking.code_version(), "rigface.storage_uri": redact(f"{storage_uri}/{tc.run_name}")}.items():
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
            # Retention is ours (_prune_checkpoints: the latest keep_checkpoints plus the best by val_loss):
            # Ray's num_to_keep would keep either the latest or the best, not both.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
    )
    stop_url = f"{storage_uri}/{tc.run_name}/{STOP_FILE}"
    data_error_url = f"{storage_uri}/{tc.run_name}/{DATA_ERROR_FILE}"
    storage.delete_prefix(stop_url)  # a stop request left by an earlier, interrupted run
    storage.delete_prefix(data_error_url)  # a data error of an earlier run: the data may have been fixed since
    if FAILURE_TAG in mlflow_client.get_run(run_id).data.tags:  # this attempt starts with a clean slate
        mlflow_client.delete_tag(run_id, FAILURE_TAG)
    with _StopOnSignal(stop_url, mlflow_client, run_id) as stop:
        try:
            result = trainer.fit()
        except Exception as exc:
            data_error = _data_error(data_error_url)
            reason = data_error or f"training run {tc.run_name} failed: {redact(exc)}"
            _fail(mlflow_client, run_id, reason)
            raise TrainError(reason) from exc
    data_error = _data_error(data_error_url)
    if data_error:  # a deterministic data fault: the retried attempt returned at once (see train_func)
        _fail(mlflow_client, run_id, data_error)
        raise TrainError(data_error)
    metrics = dict(result.metrics or {})
    if result.error is not None:
        _fail(mlflow_client, run_id, f"training run {tc.run_name} failed: {redact(result.error)}")
        raise TrainError(f"training run {tc.run_name} failed: {redact(result.error)}")
    # Ray Train V2's result keeps the metrics of the last checkpoint only: rank 0 leaves the reason on the run.
    reason = mlflow_client.get_run(run_id).data.tags.get(FAILURE_TAG, "")
    if reason.startswith(NONFINITE_REASON):
        _fail(mlflow_client, run_id, reason)
        raise TrainError(f"training run {tc.run_name} failed: {reason}")
    if stop.requested or metrics.get("stopped"):
        storage.delete_prefix(stop_url)
        mlflow_client.set_tag(run_id, FAILURE_TAG, f"interrupted by {stop.signal_name} at step {int(metrics.get('step', 0))}")
        mlflow_client.set_terminated(run_id, status="KILLED")
        raise TrainInterrupted(f"training run {tc.run_name} stopped by {stop.signal_name} after a checkpoint at step "
                               f"{int(metrics.get('step', 0))}; rerun with the same run name to resume")
    mlflow_client.set_terminated(run_id, status="FINISHED")
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = f"{storage_uri}/{tc.run_name}/{Path(result.checkpoint.path).name}"
    run = mlflow_client.get_run(run_id)
    return TrainResult(run_name=tc.run_name, mlflow_run_id=run_id, resumed=resumed,
                       steps=int(metrics.get("step", 0)), checkpoint_uri=checkpoint_uri,
                       storage_uri=f"{storage_uri}/{tc.run_name}", metrics=metrics,
                       model_uri=run.data.tags.get("rigface.model_uri"))


def _data_error(url: str) -> str:
    """The reason a rank left at ``url`` when it hit a deterministic data error, or ''."""
    try:
        return storage.read_text(url).strip() if storage.exists(url) else ""
    except Exception as exc:  # noqa: BLE001 - unreadable marker: the run's own error says enough
        log.warning("train: cannot read %s: %s", url, redact(exc))
        return ""


def _fail(mlflow_client, run_id: str, reason: str) -> None:
    """The run ends FAILED in MLflow with its reason (a tag, so the UI shows why)."""
    log.error("train: %s", reason)
    try:
        mlflow_client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    finally:
        mlflow_client.set_terminated(run_id, status="FAILED")


class _StopOnSignal:
    """SIGINT/SIGTERM while training: the first asks the workers (through a STOP object in the run's storage) to
    write a checkpoint and return; a second one stops at once. Either way the MLflow run ends KILLED."""

    def __init__(self, stop_url: str, mlflow_client, run_id: str):
        self.stop_url, self.client, self.run_id = stop_url, mlflow_client, run_id
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.requested:  # the second signal: no more waiting
            self.__exit__()
            self.client.set_tag(self.run_id, FAILURE_TAG, f"interrupted twice ({name}) before a last checkpoint")
            self.client.set_terminated(self.run_id, status="KILLED")
            raise TrainInterrupted(f"stopped by a second {name}")
        self.requested, self.signal_name = True, name
        log.warning("train: %s: writing a last checkpoint, then stopping (send it again to stop now)", name)
        storage.write_text(self.stop_url, f"{name}\n")


# ---------------------------------------------------------------- worker


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker. Reads top to bottom like a plain training script."""
    import ray.train
    import ray.train.torch
    import torch

    from pipelines.train_data import TrainDataError, fixed_batch, infinite_batches
    from pipelines.train_strategy import Strategy, check_options, make_optimizer
    from rigface.data.dataset import ReadLimits
    from rigface.model import build_rigface, training_step

    cfg = RigFaceConfig.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(tc.seed + rank)
    data_error_url = f"{config['checkpoint_root']}/{DATA_ERROR_FILE}"
    if _data_error(data_error_url):  # an earlier attempt hit a deterministic data error: retrying cannot help
        log.error("train: rank %d: not retrying a deterministic data error (%s)", rank, data_error_url)
        return

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
    scaler = _grad_scaler(device, tc.mixed_precision if strategy.name == "ddp" else "no")  # fsdp: its own policy

    # -- resume: weights, optimizer, schedule, EMA and the step count from the latest loadable checkpoint
    candidates = _checkpoint_candidates(ray.train.get_checkpoint(), cfg, config["checkpoint_root"])
    step, epoch, best, resumed_from = _restore(candidates, strategy, optimizer, scheduler, ema, scaler)
    if rank == 0 and resumed_from:
        tracking.client(cfg.storage.mlflow_tracking_uri).set_tag(config["mlflow_run_id"], "rigface.resumed_from",
                                                                 redact(f"{config['checkpoint_root']}/{resumed_from}"))
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
    nonfinite_in_a_row = 0
    stop = _StopPoll(f"{config['checkpoint_root']}/{STOP_FILE}", rank, world)

    # -- the loop: one optimizer step per iteration, grad_accum micro-batches each
    model.train()
    while step < tc.max_steps:
        t_step = time.perf_counter()
        data_wait, loss_sum, skipped = 0.0, 0.0, False
        for micro in range(tc.grad_accum):
            t_data = time.perf_counter()
            try:
                epoch, batch = next(batches)
            except TrainDataError as exc:  # the same data fails the same way on a retry: say so, then fail
                storage.write_text(data_error_url, f"{DATA_ERROR_REASON} on rank {rank}: {redact(exc)}\n")
                raise
            data_wait += time.perf_counter() - t_data
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            sync = strategy.no_sync(last_micro=micro == tc.grad_accum - 1)
            with sync:
                with autocast:
                    loss = training_step(step_components, batch, generator=generator)
                    loss = fault.maybe_poison(loss, step + 1)
                loss_value, any_bad = _all_ranks_loss(loss.detach().float(), world)
                if any_bad:  # NaN/inf on some rank: no rank trains on this step
                    skipped = True
                    break
                scaler.scale(loss / tc.grad_accum).backward()
                loss_sum += loss_value
        grad_norm = float("nan")
        if not skipped:
            scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
            grad_norm = strategy.clip_grad_norm(params, tc.max_grad_norm)
            skipped = not math.isfinite(grad_norm)
        if scaler.is_enabled() and not any_bad:
            scaler.step(optimizer)  # skips the update itself on inf/NaN gradients, and lowers the scale
            scaler.update()
            if not skipped:
                scheduler.step()
                if ema is not None:
                    ema.step(model.parameters())
        elif not skipped:
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        step += 1
        fault.maybe_crash(step)
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
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

        if nonfinite_in_a_row >= tc.max_nonfinite_steps:  # every rank counts the same (the decision is all-reduced)
            if tracker is not None:
                tracker.metrics.flush()
                tracker.client.set_tag(tracker.run_id, FAILURE_TAG, (
                    f"{NONFINITE_REASON}: {nonfinite_in_a_row} in a row (NaN/inf loss or gradient) up to step {step}, "
                    f"the limit train.max_nonfinite_steps={tc.max_nonfinite_steps}: the run stopped there"))
            log.error("train: %d non-finite steps in a row at step %d: giving up", nonfinite_in_a_row, step)
            ray.train.report({"step": step, "epoch": epoch, "failed_nonfinite": 1.0})
            return
        stopping = stop.requested()
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or (stopping and step > last_ckpt_step):
            # fsdp: rank 0 alone cannot run sharded layers, so no validation loss (retention keeps the latest K)
            val_loss = _val_loss(components, val_batch, tc.seed) \
                if val_batch is not None and strategy.name == "ddp" else None
            metrics = {"step": step, "epoch": epoch, **({"loss": loss_sum / tc.grad_accum} if not skipped else {}),
                       **({"val_loss": val_loss} if val_loss is not None else {}), **({"stopped": 1.0} if stopping else {})}
            best = _save_checkpoint(step, epoch, strategy, optimizer, scheduler, ema, scaler, config, tracker, metrics,
                                    best, val_loss, tc.keep_checkpoints)
            last_ckpt_step = step
        elif stopping:
            ray.train.report({"step": step, "epoch": epoch, "stopped": 1.0})
        if stopping:
            if tracker is not None:
                tracker.metrics.flush()
            log.warning("train: rank %d stopped on request at step %d (checkpoint %d)", rank, step, last_ckpt_step)
            return

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


def _grad_scaler(device, mixed_precision: str):
    """fp16 needs loss scaling (small gradients underflow to zero); bf16 and fp32 do not: a disabled scaler
    passes everything through."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and mixed_precision == "fp16")


def _checkpoint_candidates(latest, cfg: RigFaceConfig, checkpoint_root: str) -> list[Any]:
    """Ray's latest checkpoint first, then the older ones of this run in storage, newest first (a corrupt
    latest falls back to the one before). A fresh run has none.

    Ray registers a checkpoint only once its controller has collected every rank's report; a worker group lost
    between the upload and that (a node killed right after a checkpoint: tests/integration/test_node_loss.py)
    restarts with no latest, so the run's checkpoints in storage are used instead of training from step 0."""
    import ray.train

    try:
        names = sorted(_checkpoint_names(checkpoint_root), reverse=True)
    except Exception as exc:  # noqa: BLE001 - no listing: Ray's latest alone
        log.warning("train: cannot list older checkpoints: %s", redact(exc))
        names = []
    _, fs, path = storage_location(cfg)
    if latest is None:
        if names:
            log.warning("train: Ray has no checkpoint registered, resuming from the run's storage (%s)", names[0])
        return [ray.train.Checkpoint(path=f"{path}/{cfg.train.run_name}/{n}", filesystem=fs) for n in names]
    latest_name = Path(latest.path).name
    older = [ray.train.Checkpoint(path=f"{path}/{cfg.train.run_name}/{n}", filesystem=fs)
             for n in names if n < latest_name]
    return [latest, *older]


def _restore(candidates, strategy, optimizer, scheduler, ema, scaler) -> tuple[int, int, dict | None, str]:
    """Load the newest loadable checkpoint into the live objects: (step, next epoch, best, its name), or
    (0, 0, None, '') on a fresh run. A checkpoint that fails to load is skipped with a warning."""
    import torch

    if not candidates:
        return 0, 0, None, ""
    model = strategy.model
    errors = []
    for checkpoint in candidates:
        name = Path(checkpoint.path).name
        try:
            with checkpoint.as_directory() as d:
                loaded = strategy.model_class.from_pretrained(os.path.join(d, MODEL_DIR))
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt or partial checkpoint: try the one before
            log.warning("train: checkpoint %s cannot be loaded (%s: %s); trying the one before",
                        name, type(exc).__name__, redact(exc))
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        saved_by = state.get("strategy", "ddp")
        if saved_by != strategy.name:
            raise TrainError(f"the run's checkpoint was written by train.strategy={saved_by}; resume it with that")
        strategy.load_full_state(loaded.state_dict(), optimizer, state["optimizer"])
        del loaded
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
            ema.to(next(model.parameters()).device)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("train: resumed from step %d (%s)", state["step"], name)
        # A resumed run starts a fresh epoch: the data position inside an epoch is not kept.
        return int(state["step"]), int(state["epoch"]) + 1, state.get("best"), name
    raise TrainError(f"no checkpoint of this run can be loaded: {', '.join(errors)}")


def _val_loss(components, val_batch, seed: int) -> float:
    """The training loss on the fixed validation batch with fixed noise: comparable across checkpoints.
    The unwrapped model (no DDP: only rank 0 runs it)."""
    import torch

    from rigface.model import training_step

    model = components.model
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in val_batch.items() if isinstance(v, torch.Tensor)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = training_step(components, batch, generator=torch.Generator(device=device).manual_seed(seed + 7))
    finally:
        model.train(was_training)
    return float(loss)


def _save_checkpoint(step, epoch, strategy, optimizer, scheduler, ema, scaler, config, tracker, metrics,
                     best: dict | None, val_loss: float | None, keep: int) -> dict | None:
    """Rank 0 writes the model (save_pretrained, safetensors) and the training state; every rank reports (and,
    under fsdp, takes part in gathering the full state first). Then rank 0 keeps the latest ``keep``
    checkpoints and the best by validation loss. Returns the best."""
    import ray.train
    import torch

    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    if val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
        best = {"val_loss": val_loss, "step": step, "name": name}
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
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None, "best": best,
                        "mlflow_run_id": config["mlflow_run_id"]}, os.path.join(d, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if tracker is not None:
            _verify_upload(d, f"{config['checkpoint_root']}/{name}")
    if tracker is not None:
        root = config["checkpoint_root"]
        uri = f"{root}/{name}"
        tracker.client.set_tag(tracker.run_id, "rigface.checkpoint.latest", redact(uri))
        tracker.client.set_tag(tracker.run_id, f"rigface.checkpoint.step_{step:08d}", redact(uri))
        if val_loss is not None:
            tracker.metrics.add(step, {"val_loss": val_loss})
        if best is not None:
            tracker.client.set_tag(tracker.run_id, "rigface.checkpoint.best", redact(f"{root}/{best['name']}"))
        _prune_checkpoints(root, keep, best)
    return best


def _verify_upload(local_dir: str, uri: str) -> None:
    """Every file of the checkpoint Ray Train just reported is in storage at its size: a missing one is uploaded
    again from the still-present local copy, once; if that does not hold either, the step fails (and Ray Train
    restarts from the checkpoint before) rather than the run going on with a checkpoint it cannot resume from."""
    missing = storage.missing_from(local_dir, uri)
    if not missing:
        return
    log.warning("checkpoint %s: storage lacks %s after the upload; uploading them again", redact(uri), missing)
    for rel in missing:
        storage.upload_file(os.path.join(local_dir, rel), f"{uri}/{rel}")
    still = storage.missing_from(local_dir, uri)
    if still:
        raise RuntimeError(f"checkpoint {redact(uri)}: storage still lacks {still} after uploading them again")


def _checkpoint_names(root: str) -> set[str]:
    """checkpoint_NNNNNNNN folders of the run that hold a training state (not Ray's
    checkpoint_manager_snapshot.json beside them, not what retention pruned)."""
    import re

    pattern = re.compile(re.escape(CHECKPOINT_PREFIX) + r"\d{8}")
    out = set()
    for u in storage.list_urls(root):
        head = u[len(root) + 1:].split("/", 1)
        if len(head) == 2 and pattern.fullmatch(head[0]) and head[1] == STATE_FILE:
            out.add(head[0])
    return out


def _prune_checkpoints(root: str, keep: int, best: dict | None) -> None:
    """Empty every checkpoint of the run but the newest ``keep`` and the best one, down to a PRUNED marker
    (the marker first, so the folder never disappears from under Ray's run snapshot)."""
    try:
        names = sorted(_checkpoint_names(root))
        keep_names = set(names[-keep:]) | ({best["name"]} if best else set())
        for n in names:
            if n in keep_names:
                continue
            _prune_one(f"{root}/{n}")
    except Exception as exc:  # noqa: BLE001 - retention is housekeeping: never kill a run over it
        log.warning("train: checkpoint retention failed: %s", redact(exc))


def _prune_one(folder: str, attempts: int = 2) -> None:
    """Down to the PRUNED marker. Files only: the zero-byte folder markers ("name/" keys) that pyarrow leaves
    stay, since on a store with real folders (SeaweedFS's filer) deleting one may mean the folder. Then it checks
    and goes once more: one soak run under load found a pruned folder without its marker and with files left."""
    marker = f"{folder}/{PRUNED_FILE}"
    for attempt in range(attempts + 1):  # the last pass only checks (and puts the marker back)
        if not storage.exists(marker):
            storage.write_text(marker, "pruned by rigface's checkpoint retention (train.keep_checkpoints)\n")
        left = [u for u in storage.list_urls(f"{folder}/") if u != marker and not u.endswith("/")]
        if not left:
            return
        if attempt < attempts and storage.delete_many(left):
            log.warning("train: retention could not delete some objects of %s", redact(folder))
    log.warning("train: retention left %s unfinished", redact(folder))


class _StopPoll:
    """Whether the driver asked to stop (the STOP object): rank 0 looks every couple of seconds, and every rank
    learns its answer in the same step (one tiny broadcast), so all of them stop at the same step."""

    def __init__(self, url: str, rank: int, world: int, every_s: float = 2.0):
        self.url, self.rank, self.world, self.every_s = url, rank, world, every_s
        self._last = time.monotonic()
        self._seen = False

    def requested(self) -> bool:
        if self.rank == 0 and not self._seen and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                self._seen = storage.exists(self.url)
            except Exception as exc:  # noqa: BLE001 - a storage hiccup is not a stop request
                log.warning("train: cannot check for a stop request: %s", redact(exc))
        if self.world == 1:
            return self._seen
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._seen else 0.0])
        dist.broadcast(flag, src=0)
        return bool(flag.item() > 0)


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
    """For the fault-tolerance tests: ``RIGFACE_TRAIN_FAULT=rank=1,step=3,marker=/tmp/x`` makes that rank
    exit hard at that step, once (the marker file records that it happened); ``nan_from=5`` makes every
    rank's loss NaN from step 5 on."""

    rank: int = -1
    step: int = -1
    marker: str = ""
    nan_from: int = -1

    @classmethod
    def from_env(cls, rank: int) -> "_FaultInjection":
        spec = os.environ.get("RIGFACE_TRAIN_FAULT", "")
        if not spec:
            return cls()
        fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
        nan_from = int(fields.get("nan_from", -1))
        want = cls(int(fields.get("rank", -1)), int(fields.get("step", -1)), fields.get("marker", ""), nan_from)
        return want if want.rank == rank and want.marker else cls(nan_from=nan_from)

    def maybe_poison(self, loss, step: int):
        return loss * float("nan") if 0 <= self.nan_from <= step else loss

    def maybe_crash(self, step: int) -> None:
        if step == self.step and self.marker and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed at step {step}\n")
            log.warning("train: fault injection: worker exits at step %d", step)
            os._exit(17)
