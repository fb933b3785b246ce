"""`rigface latents` on a real local Ray and S3, then `rigface train` picking the cache up (tiny model)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

from shard_media import write_synthetic_shards  # tests/ is on pythonpath

DIM = 8


def test_latents_job_writes_resumes_and_training_uses_the_cache(stack, ray_local):
    from mlflow import MlflowClient

    from pipelines.latents import run_latents
    from pipelines.train import run_train
    from rigface.config import load_config
    from rigface.data import latents as cache
    from rigface.data import storage

    root = f"s3://{stack.bucket}/tests/latents-{os.getpid()}"
    urls = write_synthetic_shards(root, n_shards=3, per_shard=3, size=64, dim=DIM)
    storage.write_bytes(storage.join(root, "train/shard-v001-000007.tar"), b"garbage, not a tar")
    storage.write_text(storage.join(root, "train/shard-v001-000007.stats.json"), '{"samples": 3}')
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config([repo / "configs/train/tiny.yaml"], [
        f"model.expression_dim={DIM}", f"train.storage_path=s3://{stack.bucket}/tests/runs",
        "train.experiment=test-latents", "train.checkpoint_every=1000", "train.image_every=1000",
        "train.batch_size=2", "train.loader_workers=0", "latents.batch_size=2", "latents.num_actors=2",
        "latents.actor_cpus=0.5", "latents.stall_timeout_s=1234"])

    first = run_latents(cfg, data=root)
    import ray

    assert ray.data.DataContext.get_current().execution_no_progress_timeout_s == 1234  # a stall ends the job
    assert first.written == 3 and first.samples == 9 and len(first.failed) == 1 and "000007" in first.failed[0]
    assert all(cache.is_done(u, first.tag) for u in urls)
    again = run_latents(cfg, data=root)
    assert again.skipped_done == 3 and again.written == 0 and again.tag == first.tag

    # The garbage shard has no sidecar, so the cache is incomplete over all train shards: training encodes.
    no_cache = run_train(cfg, data=root, run_name="latents-incomplete", max_steps=2, num_workers=1)
    client = MlflowClient()
    assert client.get_run(no_cache.mlflow_run_id).data.tags["rigface.latent_cache"] == "none"
    storage.delete(storage.join(root, "train/shard-v001-000007.tar"))
    storage.delete(storage.join(root, "train/shard-v001-000007.stats.json"))
    cached = run_train(cfg, data=root, run_name="latents-complete", max_steps=2, num_workers=1)
    assert client.get_run(cached.mlflow_run_id).data.tags["rigface.latent_cache"] == first.tag
    assert cached.steps == 2 and cached.metrics.get("loss") is not None


def test_fsdp_two_workers_train_checkpoint_and_resume_on_cpu(stack, ray_local):
    """FSDP2 over gloo on CPU tensors: 2 Ray Train workers shard the tiny model, checkpoint the gathered full
    state at step 2, and a rerun resumes from it (loading the full state back into the shards)."""
    from mlflow import MlflowClient

    from pipelines.train import run_train
    from rigface.config import load_config

    root = f"s3://{stack.bucket}/tests/fsdp-{os.getpid()}"
    write_synthetic_shards(root, n_shards=2, per_shard=4, size=64, dim=DIM)
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config([repo / "configs/train/tiny.yaml"], [
        f"model.expression_dim={DIM}", f"train.storage_path=s3://{stack.bucket}/tests/runs",
        "train.experiment=test-fsdp", "train.checkpoint_every=2", "train.image_every=1000", "train.log_every=1",
        "train.batch_size=2", "train.loader_workers=0", "train.strategy=fsdp", "train.gradient_checkpointing=true",
        "train.latent_cache=false"])
    first = run_train(cfg, data=root, run_name="fsdp", max_steps=2, num_workers=2)
    assert first.steps == 2 and first.checkpoint_uri and first.checkpoint_uri.endswith("checkpoint_00000002")
    second = run_train(cfg, data=root, run_name="fsdp", max_steps=3, num_workers=2)
    assert second.resumed and second.steps == 3
    losses = MlflowClient().get_metric_history(second.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert all(np.isfinite(m.value) for m in losses)
    assert second.model_uri  # the final model was gathered from the shards and logged
