"""Pair-quality tools on shards: filters by name, `shards preview --sort/--where`, `shards report`, and the
training reader dropping pairs under train.min_quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rigface.data import dataset as ds_mod
from rigface.data.quality import QualityFilterError, make_predicate, parse_filter
from shard_media import write_synthetic_shards


@pytest.fixture()
def dataset(tmp_path):
    root = str(tmp_path / "ds")
    write_synthetic_shards(root, n_shards=2, per_shard=6)  # scores 0.0 .. 0.5, twice
    return root


def test_filters_parse_and_judge():
    assert parse_filter("sharpness >= 80") == ("sharpness", ">=", 80.0)
    for bad in ("sharp>=1", "score=>1", "score>=x", ""):
        with pytest.raises(QualityFilterError):
            parse_filter(bad)
    keep = make_predicate(0.3, ["sharpness>=60"])
    assert keep({"quality": {"score": 0.4, "sharpness": 70}})
    assert not keep({"quality": {"score": 0.2, "sharpness": 70}})
    assert not keep(json.dumps({"quality": {"score": 0.4, "sharpness": 50}}).encode())
    assert not keep({"quality": {"score": None, "sharpness": 70}})  # an unknown value does not pass a threshold
    assert keep({"video_id": "old"})  # shards from before quality fields: kept, nothing to judge
    assert make_predicate(None, []) is None


def test_preview_sorts_and_filters(dataset, tmp_path):
    from rigface.cli import main
    from rigface.data.preview import select_samples

    chosen = select_samples(ds_mod.iter_samples(dataset, decode=False), rows=3, sort="-score")
    assert [s.meta["quality"]["score"] for s in chosen] == [0.5, 0.5, 0.4]
    chosen = select_samples(ds_mod.iter_samples(dataset, decode=False), rows=20, sort="sharpness",
                            where=["score>=0.2", "score<=0.3"])
    assert [s.meta["quality"]["sharpness"] for s in chosen] == [70.0, 70.0, 80.0, 80.0]
    with pytest.raises(QualityFilterError):
        select_samples(ds_mod.iter_samples(dataset, decode=False), rows=2, sort="nonsense")
    out = tmp_path / "grid.png"
    assert main(["shards", "preview", dataset, "--out", str(out), "--rows", "4", "--sort=-score",
                 "--where", "face_size>=102"]) == 0
    assert Image.open(out).size[1] == 4 * (128 + 14)


def test_report_writes_histograms_and_worst_best(dataset, tmp_path):
    from rigface.cli import main

    out = tmp_path / "report"
    assert main(["shards", "report", dataset, "--out", str(out), "-n", "3"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["samples"] == 12 and summary["without_quality"] == 0
    assert summary["fields"]["score"]["min"] == 0.0 and summary["fields"]["score"]["max"] == 0.5
    worst = [int(k.rsplit("/", 1)[-1].split("-")[0]) for k in summary["worst"]]
    best = [int(k.rsplit("/", 1)[-1].split("-")[0]) for k in summary["best"]]
    assert worst[:2] == [0, 0] and best[:2] == [5, 5]
    for name in ("histograms.png", "worst.png", "best.png"):
        img = np.asarray(Image.open(out / name).convert("RGB"))
        assert img.std() > 5, name  # drawn content, not a blank canvas
    assert main(["shards", "report", dataset, "--out", str(out), "--by", "nope"]) == 1


def test_training_reader_drops_low_quality_pairs(dataset):
    from pipelines.train_data import build_pipeline, plan_epoch

    from pipelines.train_data import list_shards

    plan = plan_epoch(list_shards(dataset), rank=0, world=1, epoch=0, seed=0)

    def keys(**kw):
        pipe = build_pipeline(plan, batch_size=1, resolution=32, split="train", shuffle_buffer=1, **kw)
        return [b["__key__"][0] for b in pipe]

    assert len(keys()) == 12
    kept = keys(min_quality=0.3)
    assert len(kept) == 6 and all(int(k.rsplit("/", 1)[-1].split("-")[0]) >= 3 for k in kept)
    assert len(keys(min_quality=0.3, quality_filters=("sharpness>=90",))) == 4
