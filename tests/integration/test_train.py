"""`rigface train` end to end: tiny model, 2 CPU Ray Train workers, real local S3 + MLflow (the `stack` fixture).

Shards are written with the data module's write_shard from synthetic pairs (64 px): running `rigface prepare`
on test videos here would cost minutes of face analysis that the prepare tests already spend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

from shard_media import write_synthetic_shards  # tests/ is on pythonpath (pyproject)

EXPRESSION_DIM = 8


@pytest.fixture(scope="module")
def shard_set(stack, tmp_path_factory):
    """4 train shards of 4 pairs + 1 val shard, and one committed train shard whose bytes are garbage."""
    from rigface.data import storage

    root = f"s3://{stack.bucket}/tests/train-shards-{os.getpid()}"
    write_synthetic_shards(root, n_shards=4, per_shard=4, size=64, dim=EXPRESSION_DIM)
    write_synthetic_shards(root, n_shards=1, per_shard=4, size=64, dim=EXPRESSION_DIM, split="val")
    bad = storage.join(root, "train/shard-v001-000009.tar")
    storage.write_bytes(bad, np.random.default_rng(0).integers(0, 255, 20000, dtype=np.uint8).tobytes())
    storage.write_text(bad[:-4] + ".stats.json", '{"samples": 4}')
    return root


def tiny_cfg(stack, **train):
    from rigface.config import load_config

    repo = Path(__file__).resolve().parents[2]
    sets = [f"model.expression_dim={EXPRESSION_DIM}", f"train.storage_path=s3://{stack.bucket}/tests/runs",
            "train.experiment=test-train", "train.lr=1e-3", "train.log_every=2", "train.image_every=4",
            "train.checkpoint_every=2", "train.batch_size=2", "evaluate.num_inference_steps=2"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_config([repo / "configs/train/tiny.yaml"], sets)


def metric_steps(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_logs_everything_then_a_rerun_resumes_and_survives_a_killed_worker(
        stack, ray_local, shard_set, tmp_path, monkeypatch):
    import mlflow

    from pipelines.train import run_train
    from rigface.data import storage

    cfg = tiny_cfg(stack)
    first = run_train(cfg, data=shard_set, run_name="resume-me", max_steps=8, num_workers=2)
    assert first.steps == 8 and not first.resumed
    client = mlflow.MlflowClient()
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["data.url"] == shard_set
    assert "rigface.version" in run.data.tags
    losses = metric_steps(client, first.mlflow_run_id, "loss")
    assert [s for s, _ in losses] == list(range(1, 9))
    for key in ("lr", "samples_per_s", "step_time_s", "data_wait_s"):
        assert len(client.get_metric_history(first.mlflow_run_id, key)) == 8
    artifacts = {a.path for a in client.list_artifacts(first.mlflow_run_id, "val")}
    assert "val/step_00000004.png" in artifacts and "val/step_00000008.png" in artifacts
    assert client.list_artifacts(first.mlflow_run_id, "model")
    ckpt = run.data.tags["rigface.checkpoint.latest"]
    assert ckpt.endswith("checkpoint_00000008") and ckpt == first.checkpoint_uri
    assert storage.exists(storage.join(ckpt, "training_state.pt"))
    assert any(u.endswith(".safetensors") for u in storage.list_urls(storage.join(ckpt, "model")))

    # The rerun resumes at step 8; rank 1 is killed at step 11, once: Ray restarts from checkpoint 10.
    marker = tmp_path / "killed"
    monkeypatch.setenv("RIGFACE_TRAIN_FAULT", f"rank=1,step=11,marker={marker}")
    second = run_train(cfg, data=shard_set, run_name="resume-me", max_steps=12, num_workers=2)
    assert marker.exists(), "the fault was not injected"
    assert second.resumed and second.mlflow_run_id == first.mlflow_run_id and second.steps == 12
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
    losses = dict(metric_steps(client, first.mlflow_run_id, "loss"))  # a re-trained step 11 may log twice
    assert sorted(losses) == list(range(1, 13))  # steps 9..12 continue the curve from the checkpoint
    values = [losses[s] for s in sorted(losses)]
    assert np.mean(values[-4:]) < np.mean(values[:4])  # the loss falls
    # keep_checkpoints=2 in the tiny config: the oldest checkpoints are gone from S3, but the best (by val_loss)
    kept = {u.split("/checkpoint_")[1].split("/")[0] for u in storage.list_urls(second.storage_uri)
            if "/checkpoint_0" in u and u.endswith("/training_state.pt")}  # the pruned ones keep a marker alone
    best = client.get_run(first.mlflow_run_id).data.tags["rigface.checkpoint.best"].rsplit("_", 1)[1]
    assert kept == {"00000010", "00000012", best}


def test_bad_data_url_is_a_typed_error(stack):
    from pipelines.train import TrainError, run_train

    with pytest.raises(TrainError, match="no shards"):
        run_train(tiny_cfg(stack), data=f"s3://{stack.bucket}/tests/nothing-here", run_name="x")


def test_few_pairs_in_mostly_empty_shards_train_on_two_workers(stack, ray_local):
    """8 pairs in 9 committed shards, 6 of them empty (their videos were skipped), 2 workers: no rank is
    handed only empty shards; too little data for ranks x batch is refused before Ray Train starts."""
    from pipelines.train import TrainError, run_train
    from rigface.data.dataset import Dataset
    from rigface.data.schema import encode_sample
    from shard_media import synthetic_pair

    root = f"s3://{stack.bucket}/tests/sparse-shards-{os.getpid()}"
    ds = Dataset(root)
    sizes = [0, 3, 0, 0, 2, 0, 0, 3, 0]
    for i, n in enumerate(sizes):
        pairs = [synthetic_pair(f"v{i}", j, j + 10, 64, EXPRESSION_DIM) for j in range(n)]
        ds.write_shard(ds.shard_url("train", 1, i), [(p.key, encode_sample(p)) for p in pairs], {"split": "train"})
    assert sum(s.samples for s in ds.shards()) == 8 and len(ds.shards()) == 9

    result = run_train(tiny_cfg(stack), data=root, run_name=f"sparse-{os.getpid()}", max_steps=2, num_workers=2)
    assert result.steps == 2

    with pytest.raises(TrainError, match="cannot give 2 worker"):  # 8 < 2 x 5, before any worker starts
        run_train(tiny_cfg(stack, batch_size=5), data=root, run_name=f"too-few-{os.getpid()}", max_steps=2,
                  num_workers=2)


def test_deterministic_data_error_is_not_retried(stack, ray_local):
    """Shards whose stats promise samples but whose bytes are garbage pass the driver's count check; the rank that
    finds no full batch records the reason and the attempt Ray Train retries returns at once: the run fails
    with the data error as its reason, not with Ray's retries-exhausted error."""
    import mlflow

    from pipelines.train import DATA_ERROR_FILE, DATA_ERROR_REASON, TrainError, run_train
    from rigface.data import storage

    root = f"s3://{stack.bucket}/tests/garbage-shards-{os.getpid()}"
    rng = np.random.default_rng(1)
    for i in range(2):
        url = storage.join(root, f"train/shard-v001-{i:06d}.tar")
        storage.write_bytes(url, rng.integers(0, 255, 20000, dtype=np.uint8).tobytes())
        storage.write_text(url[:-4] + ".stats.json", '{"samples": 4, "split": "train"}')
    run_name = f"garbage-{os.getpid()}"
    with pytest.raises(TrainError) as info:
        run_train(tiny_cfg(stack, max_failures=3), data=root, run_name=run_name, max_steps=2, num_workers=1)
    assert str(info.value).startswith(DATA_ERROR_REASON), info.value
    assert "no full batch" in str(info.value)

    client = mlflow.tracking.MlflowClient()
    run = client.search_runs(client.get_experiment_by_name("test-train").experiment_id,
                             filter_string=f"tags.mlflow.runName = '{run_name}'")[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["rigface.failure"].startswith(DATA_ERROR_REASON)
    assert storage.exists(f"s3://{stack.bucket}/tests/runs/{run_name}/{DATA_ERROR_FILE}")
