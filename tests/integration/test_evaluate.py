"""`rigface evaluate` end to end: real shards on the local S3, a tiny saved model, Ray Data actors, the real
metric networks and face backends, the report on S3 and in an MLflow run of the local server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data as skdata

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _val_samples(n: int = 3):
    from rigface.data.schema import PairSample
    from rigface.face import FaceAnalyzer
    from rigface.face.config import FaceConfig

    fit = FaceAnalyzer(FaceConfig()).analyze(skdata.astronaut())
    crop = fit.crop
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        tgt = np.clip(crop.astype(np.int16) + rng.integers(-12, 12, crop.shape), 0, 255).astype(np.uint8)
        meta = {"video_id": "astro", "frames": [i, i + 30], "times": [0.0, 1.0], "split": "val",
                "boxes": {"source": list(fit.crop_box), "target": list(fit.crop_box)},
                "pose": {"source": fit.pose.angles().tolist(), "target": fit.pose.angles().tolist()},
                "lighting": {"source": fit.lighting.tolist(), "target": fit.lighting.tolist()},
                "backends": fit.backends, "scores": fit.scores}
        out.append(PairSample(key=f"astro/{i:06d}-{i + 30:06d}", source=crop, target=tgt, render=tgt,
                              background=crop, expression=np.asarray(fit.expression, np.float32),
                              mask_source=fit.mask, mask_target=fit.mask, meta=meta))
    return out


def test_evaluate_cli_end_to_end(stack, s3_prefix, tmp_path):
    import mlflow
    import ray

    from rigface.cli import main
    from rigface.data.schema import encode_sample
    from rigface.data.dataset import Dataset
    from rigface.model import build_rigface, save_rigface
    from rigface.model.config import ModelConfig

    data = f"{s3_prefix}/ds"
    samples = _val_samples(3)
    ds = Dataset(data)
    ds.write_shard(f"{data}/val/shard-v001-000000.tar", [(s.key, encode_sample(s)) for s in samples[:2]])
    ds.write_shard(f"{data}/val/shard-v001-000001.tar", [(s.key, encode_sample(s)) for s in samples[2:]])
    model_dir = tmp_path / "model"
    save_rigface(build_rigface(ModelConfig(preset="tiny", resolution=64)), str(model_dir))
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment(f"eval-{s3_prefix.rsplit('/', 1)[-1]}")
    run_id = client.create_run(exp).info.run_id

    out = f"{s3_prefix}/report"
    try:
        rc = main(["--set", "evaluate.batch_size=2", "--set", f"storage.state_dir={tmp_path / 'state'}",
                   "evaluate", "--data", data, "--model", str(model_dir), "--out", out, "--run-id", run_id,
                   "--steps", "2", "--save-images"])
    finally:
        ray.shutdown()
    assert rc == 0

    from rigface.data import storage

    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["counts"]["samples"] == 3
    # Image metrics are computed for every pair whatever the (random, tiny) model drew.
    assert report["counts"]["ssim"] == report["counts"]["lpips"] == report["counts"]["fid"] == 3
    assert 0.0 <= report["metrics"]["lpips"] and -1.0 <= report["metrics"]["ssim"] <= 1.0
    assert report["metrics"]["fid"] > 0
    # Face metrics: scored, or each missing one accounted for by a recorded skip.
    for m in ("id_l2", "apd"):
        assert report["counts"][m] + sum(report["skips"].values()) >= 3
    assert "RigFace (paper, Table 1)" in storage.read_text(f"{out}/report.md")
    assert len(storage.list_urls(f"{out}/edited", suffix=".png")) == 3

    run = client.get_run(run_id)
    assert run.data.metrics["eval/lpips"] == pytest.approx(report["metrics"]["lpips"])
    assert run.data.metrics["eval/count_samples"] == 3
    arts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/report.md", "eval/report.json"} <= arts


def test_evaluate_cli_reports_missing_data(tmp_path, capsys):
    from rigface.cli import main

    rc = main(["--set", f"storage.state_dir={tmp_path / 'state'}", "evaluate", "--data", str(tmp_path / "none"),
               "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "no 'val' shards" in capsys.readouterr().err
