"""Benchmark of `rigface train` (tiny model, CPU): Ray Train overhead and scaling, data-wait share, latent cache.

Prints one table:
  plain loop, 1 process     median step time over the same batches (the baseline)
  plain loop, latent cache  median step time with `rigface latents` sidecars (no VAE, no image decode), ratio
  VAE FLOPs saved / SD-1.5 sample   counted with torch.utils.flop_counter on SD-1.5's VAE encoder shapes (meta
                            tensors: no weights, no compute), 4 images x 512 px, and its share of a full step
  Ray Train, 1 worker       median step time (from the run's MLflow metrics), ratio to the baseline (goal <= 1.05)
  Ray Train, 2 workers      samples/s, ratio to 1 worker
  data-wait share           median share of the step spent waiting for the next batch
  SD-1.5 size, 512 px bf16  samples/s on one GPU, or 'n/a (no GPU)'

Run: .venv/bin/python bench/train.py [--steps 30] [--cache-only]  (starts a throwaway local stack: S3 + MLflow;
--cache-only measures the latent-cache rows alone, on a local folder, without the stack or Ray).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # shard_media: the synthetic shards the tests use


def plain_loop(cfg, urls, steps: int, latents_tag: str | None = None) -> float:
    """Median step time of a plain single-process loop: same model, optimizer and batches, no Ray."""
    import torch

    from pipelines.train_data import infinite_batches
    from rigface.model import build_rigface, training_step

    tc = cfg.train
    c = build_rigface(cfg.model)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(c.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    batches = infinite_batches(urls, rank=0, world=1, seed=tc.seed, batch_size=tc.batch_size,
                               resolution=cfg.model.resolution, loader_workers=tc.loader_workers,
                               shuffle_buffer=tc.shuffle_buffer, latents_tag=latents_tag)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _, batch = next(batches)
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        loss = training_step(c, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def write_latents(cfg, urls) -> str:
    """The sidecars `rigface latents` writes, made in this process by the job's own actor class."""
    from pipelines.latents import ShardLatentWriter

    writer = ShardLatentWriter(cfg.model_dump(mode="json"), use_gpu=False)
    for url in urls:
        row = writer.encode_shard(url)
        if row["status"] not in ("written", "done"):
            raise RuntimeError(f"latents for {url}: {row}")
    return writer.tag


def sd15_vae_flops() -> tuple[float, float]:
    """(VAE encoder FLOPs of one training sample's 4 images at 512 px, FLOPs of the whole training step of one
    sample: VAE + both UNets forward and backward), counted on meta tensors of SD-1.5's shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rigface.model import ModelConfig
    from rigface.model.build import build_rigface
    from rigface.model.training import training_step

    with torch.device("meta"):
        c = build_rigface(ModelConfig(preset="sd15", resolution=512, expression_dim=64))
        batch = {k: torch.empty(1, 3, 512, 512) for k in ("source", "target", "render", "background")}
        batch["expression"] = torch.empty(1, 64)
    vae_count = FlopCounterMode(display=False)
    with vae_count, torch.no_grad():
        c.vae.encode(torch.cat([batch[k] for k in ("source", "target", "render", "background")]))
    step_count = FlopCounterMode(display=False)
    with step_count:
        training_step(c, batch).backward()
    return float(vae_count.get_total_flops()), float(step_count.get_total_flops())


def cache_rows(steps: int) -> list[tuple[str, str, str]]:
    """Step time with and without the latent cache, same shards, same loop, one run; and the SD-1.5 FLOPs."""
    from pipelines.train_data import list_shards
    from rigface.config import load_config
    from shard_media import write_synthetic_shards

    with tempfile.TemporaryDirectory() as root:
        write_synthetic_shards(root, n_shards=4, per_shard=16, size=64, dim=8)
        cfg = load_config([REPO / "configs/train/tiny.yaml"], ["model.expression_dim=8", "train.batch_size=4"])
        refs = list_shards(root)  # (url, samples)
        t0 = time.perf_counter()
        tag = write_latents(cfg, [u for u, _ in refs])
        encode_s = time.perf_counter() - t0
        base = plain_loop(cfg, refs, steps)
        cached = plain_loop(cfg, refs, steps, latents_tag=tag)
    vae, step = sd15_vae_flops()
    return [
        ("tiny, plain loop, VAE each step: step time", f"{base * 1000:.1f} ms", "1.00"),
        ("tiny, plain loop, latent cache: step time", f"{cached * 1000:.1f} ms", f"{cached / base:.2f}"),
        ("tiny, speed-up from the cache (VAE / cache)", f"{base / cached:.2f}x", "-"),
        ("tiny, `rigface latents` encode time (64 pairs)", f"{encode_s:.1f} s", "-"),
        ("SD-1.5 VAE FLOPs saved per sample (4 x 512 px)", f"{vae / 1e12:.2f} TFLOP", f"{vae / step:.2f} of step"),
        ("SD-1.5 step FLOPs per sample, no cache", f"{step / 1e12:.2f} TFLOP", f"<= {step / (step - vae):.2f}x bound"),
    ]


def ray_run(cfg, data: str, name: str, steps: int, workers: int) -> dict[str, float]:
    import mlflow

    from pipelines.train import run_train

    r = run_train(cfg, data=data, run_name=name, max_steps=steps, num_workers=workers)
    client = mlflow.MlflowClient()
    med = lambda k: statistics.median(m.value for m in client.get_metric_history(r.mlflow_run_id, k)[3:])  # noqa: E731
    return {k: med(k) for k in ("step_time_s", "samples_per_s", "data_wait_share")}


def gpu_row() -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a (no GPU)"
    from _gpu_step import sd15_train_samples_per_s  # bench/ is on sys.path when run as a script

    samples_per_s, _ = sd15_train_samples_per_s(batch_size=4, steps=12)
    return f"{samples_per_s:.1f} samples/s (batch 4)"


def print_table(rows) -> None:
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>24}  ratio")
    for name, value, ratio in rows:
        print(f"{name:<{w}}  {value:>24}  {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cache-only", action="store_true", help="only the latent-cache rows (no stack, no Ray)")
    args = ap.parse_args()

    import os

    if args.cache_only:
        print_table(cache_rows(args.steps))
        return
    from shard_media import write_synthetic_shards

    import ray

    from pipelines.ray_env import start_local_ray
    from pipelines.train_data import list_shards
    from rigface.config import load_config
    from rigface.stack import LocalStack

    with tempfile.TemporaryDirectory() as state:
        stack = LocalStack(state, bucket="bench")
        os.environ.update(stack.env(stack.up()))
        try:
            data = "s3://bench/shards"
            write_synthetic_shards(data, n_shards=8, per_shard=16, size=64, dim=8)
            cfg = load_config([REPO / "configs/train/tiny.yaml"],
                              ["model.expression_dim=8", "train.checkpoint_every=100000", "train.image_every=100000",
                               "train.log_every=10", "train.storage_path=s3://bench/runs"])
            base = plain_loop(cfg, list_shards(data), args.steps)
            start_local_ray(num_cpus=2)
            one = ray_run(cfg, data, "bench-1", args.steps, 1)
            two = ray_run(cfg, data, "bench-2", args.steps, 2)
            ray.shutdown()
        finally:
            stack.down()
    rows = cache_rows(args.steps) + [
        ("plain loop, 1 process: step time", f"{base * 1000:.1f} ms", "1.00"),
        ("Ray Train, 1 worker: step time", f"{one['step_time_s'] * 1000:.1f} ms", f"{one['step_time_s'] / base:.2f}"),
        ("Ray Train, 2 workers: samples/s vs 1", f"{two['samples_per_s']:.1f} vs {one['samples_per_s']:.1f}",
         f"{two['samples_per_s'] / one['samples_per_s']:.2f}"),
        ("data-wait share of the step (1 / 2 workers)",
         f"{one['data_wait_share']:.1%} / {two['data_wait_share']:.1%}", "-"),
        ("SD-1.5 size, 512 px bf16, 1 GPU", gpu_row(), "-"),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
