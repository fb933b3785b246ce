"""Benchmark of `rigface train` (tiny model, CPU): Ray Train overhead and scaling, data-wait share.

Prints one table:
  plain loop, 1 process     median step time over the same batches (the baseline)
  Ray Train, 1 worker       median step time (from the run's MLflow metrics), ratio to the baseline (goal <= 1.05)
  Ray Train, 2 workers      samples/s, ratio to 1 worker
  data-wait share           median share of the step spent waiting for the next batch
  SD-1.5 size, 512 px bf16  samples/s on one GPU, or 'n/a (no GPU)'

Run: .venv/bin/python bench/train.py [--steps 30]  (starts a throwaway local stack: S3 + MLflow).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def plain_loop(cfg, urls, steps: int) -> float:
    """Median step time of a plain single-process loop: same model, optimizer and batches, no Ray."""
    import torch

    from pipelines.train_data import infinite_batches
    from rigface.model import build_rigface, training_step

    tc = cfg.train
    c = build_rigface(cfg.model)
    opt = torch.optim.AdamW(c.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    batches = infinite_batches(urls, rank=0, world=1, seed=tc.seed, batch_size=tc.batch_size,
                               resolution=cfg.model.resolution, loader_workers=tc.loader_workers,
                               shuffle_buffer=tc.shuffle_buffer)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
    from test_train_data import write_synthetic_shards

    import ray

    from pipelines.train_data import list_shards
    from rigface.config import load_config
    from rigface.stack import LocalStack

    with tempfile.TemporaryDirectory() as state:
        stack = LocalStack(state, bucket="bench")
        os.environ.update(stack.env(stack.up()))
        try:
            data = "s3://bench/shards"
            write_synthetic_shards(data, n_shards=8, per_shard=16, size=64, dim=8)
            cfg = load_config([Path(__file__).resolve().parents[1] / "configs/train/tiny.yaml"],
                              ["model.expression_dim=8", "train.checkpoint_every=100000", "train.image_every=100000",
                               "train.log_every=10", "train.storage_path=s3://bench/runs"])
            base = plain_loop(cfg, list_shards(data), args.steps)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            one = ray_run(cfg, data, "bench-1", args.steps, 1)
            two = ray_run(cfg, data, "bench-2", args.steps, 2)
            ray.shutdown()
        finally:
            stack.down()
    rows = [
        ("plain loop, 1 process: step time", f"{base * 1000:.1f} ms", "1.00"),
        ("Ray Train, 1 worker: step time", f"{one['step_time_s'] * 1000:.1f} ms", f"{one['step_time_s'] / base:.2f}"),
        ("Ray Train, 2 workers: samples/s vs 1", f"{two['samples_per_s']:.1f} vs {one['samples_per_s']:.1f}",
         f"{two['samples_per_s'] / one['samples_per_s']:.2f}"),
        ("data-wait share of the step (1 / 2 workers)",
         f"{one['data_wait_share']:.1%} / {two['data_wait_share']:.1%}", "-"),
        ("SD-1.5 size, 512 px bf16, 1 GPU", gpu_row(), "-"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>24}  ratio")
    for name, value, ratio in rows:
        print(f"{name:<{w}}  {value:>24}  {ratio}")


if __name__ == "__main__":
    main()
