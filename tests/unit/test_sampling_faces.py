"""Face-aware pair sampling on real clips: a clip whose face shows in only part of it still gives its pairs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import face_media as fm
from rigface.data.sampling import face_spans, min_gap_frames, probe_indices, sample_pairs_among

PROBE = {"every_seconds": 0.5, "max_probes": 64, "side": 640, "min_confidence": 0.6, "min_face_size": 64}


def test_probe_indices_cover_the_video():
    idx = probe_indices(169, 26.5, 0.5, 64)
    assert idx[0] == 0 and idx[-1] == 168 and len(idx) <= 64 and np.all(np.diff(idx) > 0)
    assert len(probe_indices(100_000, 30, 0.5, 64)) <= 64  # long videos: the stride widens
    assert probe_indices(0, 30, 0.5, 64) == [] and probe_indices(1, 30, 0.5, 64) == [0]


def test_face_spans_and_pairs_among_them():
    probes = [0, 10, 20, 30, 40]
    frames = face_spans(probes, [False, False, True, True, True], 45)
    assert frames[0] == 16 and frames[-1] == 44 and 15 not in frames
    pairs = sample_pairs_among(frames, 10.0, 6, 1.0, seed=1, salt="x")
    assert len(pairs) == 6 and len({frozenset(p) for p in pairs}) == 6
    assert all(a in frames and b in frames and abs(a - b) >= 10 for a, b in pairs)
    assert pairs == sample_pairs_among(frames, 10.0, 6, 1.0, seed=1, salt="x")  # reproducible
    assert sample_pairs_among([1, 2, 3], 10.0, 4, 1.0) == []  # no two face frames far enough apart
    # A span too small for the requested count yields every pair it holds, once.
    few = sample_pairs_among(list(range(0, 12)), 10.0, 50, 1.0)
    assert len(few) == 3 and min_gap_frames(10.0, 1.0) == 10


@pytest.mark.parametrize("name,face_half", [("noface_face.mov", "second"), ("face_noface.mov", "first")])
def test_decode_stage_finds_the_face_half_of_a_real_clip(tmp_path, name, face_half):
    from pipelines.prepare import decode_row

    src = tmp_path / name
    shutil.copy(fm.feat_file(name), src)
    row = {"shard": "s", "video_id": "v", "content_hash": "h", "split": "train", "url": str(src), "name": name}
    blind = decode_row(dict(row), n_pairs=8, spare=4, min_gap_seconds=1.0, seed=0, max_side=4096)
    aware = decode_row(dict(row), n_pairs=8, spare=4, min_gap_seconds=1.0, seed=0, max_side=4096, probe=PROBE)
    assert aware["status"] == "" and 0.3 < aware["face_coverage"] < 0.7, aware["face_coverage"]
    n = aware["n_frames"]
    cands = json.loads(aware["candidates"])
    assert len(cands) == 12
    frames = {f for p in cands for f in p}
    # The title card / the empty half never reaches analysis: every candidate frame is in the face half.
    if face_half == "second":
        assert min(frames) >= 0.4 * n
    else:
        assert max(frames) <= 0.6 * n
    assert blind["face_coverage"] == -1.0
    blind_frames = {f for p in json.loads(blind["candidates"]) for f in p}
    # Without the probe, frames are drawn from the whole clip: many land where there is no face.
    outside = [f for f in blind_frames if (f < 0.4 * n if face_half == "second" else f > 0.6 * n)]
    assert len(outside) >= 2, blind_frames


def test_decode_stage_no_face_clip_is_a_recorded_skip(tmp_path):
    from pipelines.prepare import decode_row

    src = tmp_path / "no_face.mp4"
    shutil.copy(fm.feat_file("no_face.mp4"), src)
    row = {"shard": "s", "video_id": "v", "content_hash": "h", "split": "train", "url": str(src), "name": "x"}
    out = decode_row(row, n_pairs=4, spare=2, min_gap_seconds=1.0, seed=0, max_side=4096, probe=PROBE)
    assert out["status"] == "no_face" and out["face_coverage"] == 0.0 and out["frames"] is None
