"""The evaluate job's per-batch logic without Ray: decode, edit, score, skips, Ray row format, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data as skdata

from pipelines.evaluate import (
    MEMBER_COLUMNS,
    edit_and_score,
    from_row,
    to_columns,
    val_shards,
    write_report,
)
from rigface.data.schema import PairSample, encode_sample
from rigface.eval.lpips_net import LPIPS
from rigface.eval.scorer import PairScorer, ReportBuilder

SIZE = 64


def make_sample(i: int, split: str = "val") -> PairSample:
    rng = np.random.default_rng(i)
    src = np.ascontiguousarray(skdata.astronaut()[20 + 10 * i:20 + 10 * i + SIZE, 180:180 + SIZE])
    tgt = np.clip(src.astype(np.int16) + rng.integers(-25, 25, src.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    meta = {"video_id": "vid", "frames": [i, i + 10], "times": [0.0, 1.0], "split": split,
            "boxes": {"source": [0, 0, SIZE, SIZE], "target": [0, 0, SIZE, SIZE]},
            "pose": {"source": [0, 0, 0], "target": [0, 0, 0]}, "lighting": {"source": [], "target": []},
            "backends": {}, "scores": {}}
    return PairSample(key=f"vid/{i:06d}-{i + 10:06d}", source=src, target=tgt, render=tgt, background=src,
                      expression=rng.random(52).astype(np.float32), mask_source=mask, mask_target=mask, meta=meta)


def raw_row(sample: PairSample) -> dict:
    members = encode_sample(sample)
    return {"key": sample.key, "error": "", **{m: members[m] for m in MEMBER_COLUMNS}}


class FakeEmbedder:
    """Embeds by mean colour: identical images are at distance 0."""

    def embed(self, crop):
        return np.asarray(crop, np.float64).reshape(-1, 3).mean(0) + 1.0


@pytest.fixture(scope="module")
def scorer():
    return PairScorer(lpips=LPIPS.pretrained("alex"), inception=None, embedder=FakeEmbedder(), analyzer=None)


def test_perfect_edit_scores_perfectly_and_bad_rows_are_skips(scorer):
    samples = [make_sample(i) for i in range(3)]
    rows = [raw_row(s) for s in samples]
    rows[1]["target.jpg"] = b"not a jpeg"
    rows.append({"key": "s3://b/x.tar", "error": "unreadable_shard", **{m: b"" for m in MEMBER_COLUMNS}})
    recs = edit_and_score(rows, lambda ss: [s.target for s in ss], scorer)
    by_key = {r["key"]: r for r in recs}
    ok = by_key[samples[0].key]
    assert ok["ssim"] == pytest.approx(1.0, abs=1e-4)  # target survives JPEG decode identically on both sides
    assert ok["lpips"] == pytest.approx(0.0, abs=1e-5)
    assert ok["id_l2"] > 0  # edited (= target) vs source differ by the noise
    assert by_key[samples[1].key]["skips"] == ["bad_sample"]
    assert by_key["s3://b/x.tar"]["skips"] == ["unreadable_shard"]
    assert len(recs) == 4


def test_source_as_edit_is_worse_than_target_as_edit(scorer):
    rows = [raw_row(make_sample(i)) for i in range(2)]
    good = edit_and_score(rows, lambda ss: [s.target for s in ss], scorer)
    bad = edit_and_score(rows, lambda ss: [s.source for s in ss], scorer)
    for g, b in zip(good, bad):
        assert b["ssim"] < g["ssim"] and b["lpips"] > g["lpips"]
        assert b["id_l2"] == pytest.approx(0.0, abs=1e-9)  # the source itself keeps the identity exactly


def test_failed_edit_is_recorded_and_rows_round_trip(scorer, tmp_path):
    rows = [raw_row(make_sample(i)) for i in range(2)]

    def broken(_):
        raise ValueError("expression must be (2, 64)")

    recs = edit_and_score(rows, broken, scorer)
    assert [r["skips"] for r in recs] == [["edit_failed"], ["edit_failed"]]
    good = edit_and_score(rows, lambda ss: [s.target for s in ss], scorer)
    good[0]["feat_edited"] = good[0]["feat_target"] = np.ones(2048, np.float32)
    cols = to_columns(good + recs)
    assert cols["feat_edited"].shape == (4, 2048) and list(cols["has_feat"]) == [True, False, False, False]
    back = [from_row({c: v[i] for c, v in cols.items()}) for i in range(4)]
    assert back[0]["ssim"] == pytest.approx(good[0]["ssim"]) and "feat_edited" in back[0]
    assert back[2]["skips"] == ["edit_failed"] and "feat_edited" not in back[2]

    builder = ReportBuilder().add(good)
    for r in recs:
        builder.skip(r["skips"][0])
    report = builder.build({"model": "fake"})
    assert report.counts["samples"] == 4 and report.counts["ssim"] == 2
    assert report.skips == {"edit_failed": 2}
    assert report.metrics["fid"] is None  # one feature vector: no FID, said in the notes
    write_report(report, str(tmp_path), [{"key": "a", "ssim": float("nan")}])
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["samples"] == 4
    assert "RigFace (paper, Table 1)" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "per_pair.jsonl").read_text().splitlines()[0])["ssim"] is None


def test_val_shards_prefers_committed(tmp_path):
    from rigface.data.dataset import Dataset

    root = tmp_path / "ds"
    s = make_sample(0)
    Dataset(str(root)).write_shard(str(root / "val" / "shard-v001-000000.tar"), [(s.key, encode_sample(s))])
    (root / "val" / "shard-v001-000001.tar").write_bytes(b"partial")  # no stats marker: unfinished
    (root / "train").mkdir()
    assert val_shards(str(root)) == [str(root / "val" / "shard-v001-000000.tar")]
    assert val_shards(str(root / "val" / "x.tar")) == [str(root / "val" / "x.tar")]
    assert val_shards(str(root), "test") == []
