"""Issue 12: training fails loudly and stops cleanly (tiny model, 1 Ray Train worker, real local S3 + MLflow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shard_media import write_synthetic_shards  # tests/ is on pythonpath (pyproject)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPRESSION_DIM = 8


@pytest.fixture(scope="module")
def shard_set(stack):
    root = f"s3://{stack.bucket}/tests/train-faults-{os.getpid()}"
    write_synthetic_shards(root, n_shards=2, per_shard=4, size=64, dim=EXPRESSION_DIM)
    write_synthetic_shards(root, n_shards=1, per_shard=4, size=64, dim=EXPRESSION_DIM, split="val")
    return root


def overrides(stack, **train):
    sets = [f"model.expression_dim={EXPRESSION_DIM}", f"train.storage_path=s3://{stack.bucket}/tests/runs",
            "train.experiment=test-train-faults", "train.lr=1e-3", "train.log_every=1", "train.image_every=1000",
            "train.checkpoint_every=2", "train.batch_size=2", "train.num_workers=1", "train.val_batch_size=2"]
    return sets + [f"train.{k}={v}" for k, v in train.items()]


def tiny_cfg(stack, **train):
    from rigface.config import load_config

    return load_config([REPO / "configs/train/tiny.yaml"], overrides(stack, **train))


def test_nonfinite_steps_in_a_row_end_the_run_failed(stack, ray_local, shard_set, monkeypatch):
    import mlflow

    from pipelines.train import TrainError, run_train

    monkeypatch.setenv("RIGFACE_TRAIN_FAULT", "nan_from=3")
    with pytest.raises(TrainError, match="non-finite steps: 3 in a row"):
        run_train(tiny_cfg(stack, max_nonfinite_steps=3), data=shard_set, run_name="nan-run", max_steps=50)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("test-train-faults")
    run = client.search_runs([exp.experiment_id], "tags.`rigface.run_name` = 'nan-run'")[0]
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["rigface.failure"] and "step 5" in run.data.tags["rigface.failure"]
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "skipped_nonfinite"))
    assert skipped == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0)]  # it stopped at the limit, not at 50
    assert not client.list_artifacts(run.info.run_id, "model")  # nothing trained is logged as a model


def test_retention_keeps_best_and_latest_and_a_corrupt_latest_falls_back(stack, ray_local, shard_set):
    import mlflow

    from pipelines.train import run_train
    from rigface.data import storage

    cfg = tiny_cfg(stack, keep_checkpoints=2)
    first = run_train(cfg, data=shard_set, run_name="corrupt-latest", max_steps=8)
    client = mlflow.MlflowClient()
    tags = client.get_run(first.mlflow_run_id).data.tags
    best = tags["rigface.checkpoint.best"].rsplit("/", 1)[1]
    val = dict((m.step, m.value) for m in client.get_metric_history(first.mlflow_run_id, "val_loss"))
    assert sorted(val) == [2, 4, 6, 8] and best == f"checkpoint_{min(val, key=val.get):08d}"

    def folders() -> dict[str, set[str]]:  # checkpoint number -> the files in its folder
        out: dict[str, set[str]] = {}
        for u in storage.list_urls(first.storage_uri):
            if "/checkpoint_0" in u:
                num, rest = u.split("/checkpoint_")[1].split("/", 1)
                out.setdefault(num, set()).add(rest)
        return out

    kept = {n for n, files in folders().items() if "training_state.pt" in files}
    assert kept == {"00000006", "00000008", best.split("_")[1]}
    # A pruned checkpoint keeps its folder with a marker alone: Ray's run snapshot lists every checkpoint
    # reported, and a rerun under this name refuses to start if one of their folders is gone (on AWS S3 always).
    pruned = {n: files for n, files in folders().items() if n not in kept}
    # (pyarrow's zero-byte folder markers, "" and "model/", may stay)
    assert pruned and all({f for f in files if f and not f.endswith("/")} == {"PRUNED"}
                          for files in pruned.values()), pruned
    # The latest checkpoint's state is garbage (a torn upload): the rerun resumes from the one before.
    storage.write_bytes(storage.join(first.checkpoint_uri, "training_state.pt"), b"\x00not a torch file" * 50)
    second = run_train(cfg, data=shard_set, run_name="corrupt-latest", max_steps=10)
    assert second.resumed and second.mlflow_run_id == first.mlflow_run_id and second.steps == 10
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rigface.resumed_from"].endswith("/checkpoint_00000006")
    losses = sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "loss"))
    assert losses[-1] == 10 and 7 in losses and 8 in losses  # steps 7-8 were trained again from 6


def test_pruning_keeps_folder_markers_and_finishes_a_half_pruned_folder(stack):
    """As one soak run under load left a pruned checkpoint: marker gone, model files left. Pruning it again
    ends at the marker, and pyarrow's zero-byte folder markers stay (on SeaweedFS a "name/" key is a folder)."""
    from pipelines.train import PRUNED_FILE, _prune_one
    from rigface.data import storage

    base = f"tests/prune-{os.getpid()}/checkpoint_00000002"
    s3 = storage.s3_client()
    for key, body in ((f"{base}/", b""), (f"{base}/model/", b""), (f"{base}/model/config.json", b"{}"),
                      (f"{base}/model/diffusion_pytorch_model.safetensors", b"w" * 100)):
        s3.put_object(Bucket=stack.bucket, Key=key, Body=body)
    folder = f"s3://{stack.bucket}/{base}"
    _prune_one(folder)
    assert {u[len(folder) + 1:] for u in storage.list_urls(folder + "/")} == {"", "model/", PRUNED_FILE}


def test_sigterm_writes_a_last_checkpoint_and_marks_the_run_killed(stack, ray_local, shard_set, tmp_path):
    import mlflow

    from rigface.data import storage

    # The job in its own process, as `rigface train` runs (its own local Ray): signalled mid-run.
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        "from rigface.config import load_config\n"
        "from pipelines.train import TrainInterrupted, run_train\n"
        f"cfg = load_config([{str(REPO / 'configs/train/tiny.yaml')!r}], {overrides(stack, checkpoint_every=1000)!r})\n"
        "try:\n"
        f"    run_train(cfg, data={shard_set!r}, run_name='sigterm-run', max_steps=10000)\n"
        "except TrainInterrupted as exc:\n"
        "    print('INTERRUPTED', exc, flush=True)\n"
        "    sys.exit(130)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'tests'}"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    client = mlflow.MlflowClient()
    exp_runs = []
    deadline = time.monotonic() + 400  # a fresh process, its own Ray and model: minutes on a loaded box
    while time.monotonic() < deadline and proc.poll() is None:  # wait until it has trained a few steps
        exp = client.get_experiment_by_name("test-train-faults")
        exp_runs = client.search_runs([exp.experiment_id], "tags.`rigface.run_name` = 'sigterm-run'") if exp else []
        if exp_runs and len(client.get_metric_history(exp_runs[0].info.run_id, "loss")) >= 3:
            break
        time.sleep(1)
    assert exp_runs, "the job never started training"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    run = client.get_run(exp_runs[0].info.run_id)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["rigface.failure"]
    latest = run.data.tags["rigface.checkpoint.latest"]
    step = int(latest.rsplit("_", 1)[1])
    assert step >= 3 and storage.exists(storage.join(latest, "training_state.pt"))  # written on the way out
    assert not storage.exists(storage.join(latest.rsplit("/", 1)[0], "STOP"))
