"""`rigface latents`: the frozen VAE's latents of every committed shard, written beside it (Ray Data).

The VAE is frozen, so encoding the same four images of a sample at every step of every epoch is wasted work.
This job does it once: one Ray Data row per shard, a pool of encoder actors (one GPU each where GPUs are used,
fractional CPUs otherwise) that read a shard, decode its images exactly as the trainer does, encode them in
batches and write one sidecar per shard, then its marker (rigface.data.latents owns the layout). Sidecars are
keyed by the VAE's identity and the resolution, so a rerun skips finished shards and another VAE writes its
own. Training picks them up when every train shard has one made by the model's own VAE.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from rigface.config import RigFaceConfig

from pipelines.ray_env import bound_ray_data, ensure_ray
from pipelines.resources import use_gpus

log = logging.getLogger(__name__)


class LatentsError(RuntimeError):
    """The job cannot start (no data) or some shards could not be encoded."""


@dataclasses.dataclass
class LatentsResult:
    tag: str | None
    shards: int
    written: int
    skipped_done: int
    failed: list[str]
    samples: int
    seconds: float


class ShardLatentWriter:
    """A Ray Data actor: the VAE once, then one shard per call."""

    def __init__(self, cfg_json: dict[str, Any], use_gpu: bool):
        import torch

        from rigface.data import latents as cache
        from rigface.model.build import build_vae

        self.cfg = RigFaceConfig.model_validate(cfg_json)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.vae = build_vae(self.cfg.model).to(self.device)  # fp32: the stored latents are the reference
        self.tag = cache.cache_tag(cache.vae_identity(self.vae), self.cfg.model.resolution)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {"shard": [], "tag": [], "status": [], "samples": [], "skipped": [], "error": []}
        for url in batch["shard"]:
            row = self.encode_shard(str(url))
            for k in out:
                out[k].append(row.get(k, "" if k in ("status", "error", "tag", "shard") else 0))
        return out

    def encode_shard(self, url: str) -> dict[str, Any]:
        import numpy as np
        import torch

        from pipelines.train_data import decode_for_training
        from rigface.data import latents as cache
        from rigface.data.schema import SchemaError
        from rigface.data.dataset import ReadLimits, read_shard
        from rigface.data.shards import SKIP, ShardError
        from rigface.model.training import cacheable_latents

        lc = self.cfg.latents
        base = {"shard": url, "tag": self.tag}
        if not lc.overwrite and cache.is_done(url, self.tag):
            return {**base, "status": "done"}
        t0 = time.perf_counter()
        keys: list[str] = []
        parts: dict[str, list] = {k: [] for k in cache.LATENT_KEYS}
        pending: list[dict[str, Any]] = []
        skipped = 0
        dtype = getattr(torch, lc.dtype)

        def flush() -> None:
            if not pending:
                return
            images = {k: torch.from_numpy(np.stack([p[k] for p in pending]))
                      for k in ("source", "target", "background", "render")}
            for name, t in cacheable_latents(self.vae, images).items():
                parts[name].append(t.to(dtype))
            keys.extend(p["__key__"] for p in pending)
            pending.clear()

        try:
            limits = ReadLimits.from_config(self.cfg.reader)
            for raw in read_shard(url, limits):
                try:
                    if raw.get(SKIP):
                        raise SchemaError(raw[SKIP])
                    pending.append(decode_for_training(raw, self.cfg.model.resolution, limits))
                except SchemaError as exc:
                    skipped += 1
                    log.warning("latents: %s: sample skipped: %s", url, exc)
                    continue
                if len(pending) == lc.batch_size:
                    flush()
            flush()
            if not keys:
                return {**base, "status": "failed", "skipped": skipped, "error": "no decodable sample"}
            tensors = {k: torch.cat(v) for k, v in parts.items()}
            cache.write_sidecar(url, self.tag, keys, tensors, {
                "resolution": self.cfg.model.resolution, "dtype": lc.dtype, "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 3), "device": self.device.type})
        except (ShardError, OSError) as exc:  # one unreadable shard is recorded, the job goes on
            log.warning("latents: %s failed: %s", url, exc)
            return {**base, "status": "failed", "skipped": skipped, "error": str(exc)[:500]}
        return {**base, "status": "written", "samples": len(keys), "skipped": skipped}


def run_latents(cfg: RigFaceConfig, *, data: str | None = None) -> LatentsResult:
    """Encode every committed shard under ``data`` (default ``latents.data``, then ``train.data``)."""
    import ray

    from pipelines.train_data import TrainDataError, list_shards
    from rigface.data.dataset import ReadLimits

    url = data or cfg.latents.data or cfg.train.data
    if not url:
        raise LatentsError("no data: pass --data URL or set latents.data")
    try:
        shards = [u for u, _ in list_shards(url, ReadLimits.from_config(cfg.reader))]
    except (TrainDataError, OSError) as exc:
        raise LatentsError(f"no shards under {url}: {exc}") from exc
    lc = cfg.latents
    t0 = time.perf_counter()
    ensure_ray()
    bound_ray_data(lc.stall_timeout_s)  # every retry bounded (Ray's defaults are unlimited), a stall ends the job
    # resources.gpus: on for an autoscaling cluster (GPU nodes may be at zero now); auto: GPUs present now.
    use_gpu = use_gpus(cfg.resources, ray.cluster_resources().get("GPU", 0))
    actors = max(1, min(lc.num_actors, len(shards)))
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        ShardLatentWriter,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json"), "use_gpu": use_gpu},
        batch_size=1,
        concurrency=actors,
        num_cpus=lc.actor_cpus,
        num_gpus=1 if use_gpu else None,
        # A lost actor (node, OOM) is restarted a bounded number of times and its shard tried again; a shard that
        # fails to read is a recorded failure inside the actor, never a retry.
        max_restarts=lc.max_actor_restarts, max_task_retries=-1,
    )
    rows = ds.take_all()
    failed = [f"{r['shard']}: {r['error']}" for r in rows if r["status"] == "failed"]
    result = LatentsResult(
        tag=next((r["tag"] for r in rows if r["tag"]), None), shards=len(shards),
        written=sum(r["status"] == "written" for r in rows), skipped_done=sum(r["status"] == "done" for r in rows),
        failed=failed, samples=sum(int(r["samples"]) for r in rows), seconds=time.perf_counter() - t0)
    log.info("latents: %s", result)
    return result
