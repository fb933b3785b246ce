"""Shard schema, pair sampling and shard I/O (no Ray, no face analysis)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from rigface.data import dataset, schema, shards
from rigface.data.dataset import Dataset
from rigface.data.sampling import max_pairs, min_gap_frames, replace_failed, sample_distant_pairs
from rigface.data.schema import PairSample, SchemaError


def make_sample(video="clip-abc", a=3, b=40, size=64, split="train", seed=0) -> PairSample:
    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noqa: E731
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return PairSample(
        key=schema.sample_key(video, a, b), source=img(), target=img(), render=img(), background=img(),
        expression=rng.standard_normal(52).astype(np.float32), mask_source=mask, mask_target=mask.copy(),
        meta={"video_id": video, "frames": [a, b], "times": [a / 10, b / 10], "split": split,
              "boxes": {"source": [0, 0, 10, 10], "target": [1, 1, 11, 11]},
              "pose": {"source": [0, 0, 0], "target": [5, 0, 0]}, "lighting": {"source": [], "target": []},
              "backends": {"detector": "test"}, "scores": {}},
    )


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("name", ["my clip.v2", "vidéo été/ünï", "../../etc/passwd", "a.b.c", "", "日本語"])
def test_safe_video_id_is_tar_safe_and_keys_round_trip(name):
    vid = schema.safe_video_id(name)
    assert vid and "." not in vid and "/" not in vid
    key = schema.sample_key(vid, 1, 123456)
    assert schema.parse_key(key) == (vid, 1, 123456)
    assert schema.split_member_name(f"{key}.source.jpg") == (key, "source.jpg")


def test_safe_video_id_keeps_distinct_names_distinct():
    assert schema.safe_video_id("a b") != schema.safe_video_id("a-b")
    assert schema.safe_video_id("clip", "ab" * 32) == "clip-abababab" + "ab"


@pytest.mark.parametrize("bad", ["/abs/000001-000002.source.jpg", "../x/000001-000002.source.jpg",
                                 "vid/../000001-000002.source.jpg", "vid/000001-000002", "v.d/1-2.jpg"])
def test_unsafe_member_names_are_refused(bad):
    with pytest.raises(SchemaError):
        schema.split_member_name(bad)


def test_sample_key_refuses_unsafe_video_id():
    with pytest.raises(SchemaError):
        schema.sample_key("a/b", 1, 2)


# ---------------------------------------------------------------- encode / decode / validate


def test_encode_decode_round_trip():
    s = make_sample()
    members = schema.encode_sample(s, jpeg_quality=95)
    assert set(members) == set(schema.MEMBERS)
    back = schema.decode_sample({"__key__": s.key, **{"." + k: v for k, v in members.items()}})
    assert back.key == s.key
    np.testing.assert_array_equal(back.render, s.render)          # PNG: lossless
    np.testing.assert_array_equal(back.mask_source, s.mask_source)
    np.testing.assert_array_equal(back.expression, s.expression)
    assert back.expression.dtype == np.float32
    assert np.abs(back.source.astype(int) - s.source).mean() < 20  # JPEG: lossy but close
    assert back.meta["schema_version"] == schema.SCHEMA_VERSION and back.meta["frames"] == [3, 40]
    assert schema.validate_sample(back) == []
    assert schema.validate_sample({"__key__": s.key, **members}) == []


def test_encode_refuses_bad_samples():
    s = make_sample()
    s.render = s.render[:32]
    with pytest.raises(SchemaError, match="render"):
        schema.encode_sample(s)
    s = make_sample()
    s.meta.pop("split")
    with pytest.raises(SchemaError, match="split"):
        schema.encode_sample(s)
    s = make_sample()
    s.meta["frames"] = [1, 2]
    with pytest.raises(SchemaError, match="disagree"):
        schema.encode_sample(s)
    s = make_sample()
    s.expression = np.array([np.nan], np.float32)
    with pytest.raises(SchemaError, match="non-finite"):
        schema.encode_sample(s)


def test_validate_reports_broken_members():
    s = make_sample()
    members = schema.encode_sample(s)
    broken = dict(members, **{"render.png": b"not a png"})
    faults = schema.validate_sample({"__key__": s.key, **broken})
    assert faults and "cannot decode" in faults[0]
    missing = {k: v for k, v in members.items() if k != "meta.json"}
    assert "missing" in schema.validate_sample({"__key__": s.key, **missing})[0]


def test_masks_are_binarised():
    s = make_sample()
    s.mask_source = (s.mask_source > 0)  # bool mask
    s.mask_target = (s.mask_target / 255.0).astype(np.float32)
    back = schema.decode_sample({"__key__": s.key, **schema.encode_sample(s)})
    assert set(np.unique(back.mask_source)) <= {0, 255} and back.mask_source.max() == 255
    assert set(np.unique(back.mask_target)) <= {0, 255} and back.mask_target.max() == 255


# ---------------------------------------------------------------- sampling


def test_pairs_are_far_apart_distinct_and_reproducible():
    pairs = sample_distant_pairs(300, 25.0, 8, 1.0, seed=3, salt="v1")
    assert len(pairs) == 8
    assert all(abs(a - b) >= 25 for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == 8
    assert all(0 <= f < 300 for p in pairs for f in p)
    assert pairs == sample_distant_pairs(300, 25.0, 8, 1.0, seed=3, salt="v1")
    assert pairs != sample_distant_pairs(300, 25.0, 8, 1.0, seed=4, salt="v1")
    assert pairs != sample_distant_pairs(300, 25.0, 8, 1.0, seed=3, salt="v2")
    assert {a < b for a, b in sample_distant_pairs(300, 25.0, 40, 1.0, seed=0)} == {True, False}


def test_short_video_and_cap():
    assert sample_distant_pairs(20, 25.0, 8, 1.0) == []  # shorter than the minimum gap
    gap = min_gap_frames(10.0, 1.0)
    assert gap == 10 and max_pairs(12, gap) == 3
    small = sample_distant_pairs(12, 10.0, 8, 1.0)
    assert len(small) == 3 and len({frozenset(p) for p in small}) == 3  # exhausts the space exactly
    assert len(sample_distant_pairs(1000, 10.0, 50, 1.0, cap=5)) == 5


def test_replacement_uses_only_passed_frames():
    cands = sample_distant_pairs(200, 10.0, 12, 1.0, seed=1)
    failed = {cands[0][0], cands[1][1], cands[2][0]}
    ok = [f for f in range(200) if f % 7 and f not in failed]
    chosen = replace_failed(cands, ok, 8, gap=10, seed=1)
    assert len(chosen) == 8
    assert all(a in ok and b in ok and abs(a - b) >= 10 for a, b in chosen)
    assert chosen == replace_failed(cands, ok, 8, gap=10, seed=1)
    # Too few candidates survive: new pairs are formed from passed frames.
    topup = replace_failed(cands[:2], [0, 15, 30, 45], 4, gap=10)
    assert len(topup) == 4 and all(abs(a - b) >= 10 for a, b in topup)
    assert replace_failed(cands, [5], 8, gap=10) == []


# ---------------------------------------------------------------- shards


def test_write_read_validate_shard(tmp_path):
    out = tmp_path / "ds"
    samples = [make_sample(a=i, b=i + 20, seed=i) for i in range(3)]
    packed = [(s.key, schema.pack_sample(s.key, schema.encode_sample(s))) for s in samples]
    ds = Dataset(str(out))
    url = ds.shard_url("train", 1, 0)
    stats = ds.write_shard(url, packed, {"videos": 1, "skips": {"no_face": 2}})
    assert ds.is_committed(url) and stats["samples"] == 3 and stats["skips"] == {"no_face": 2}
    assert [(s.url, s.split, s.samples) for s in ds.shards()] == [(url, "train", 3)]
    # Deterministic bytes: the same samples give the same shard.
    url2 = str(tmp_path / "again" / "s.tar")
    assert Dataset(str(tmp_path / "again")).write_shard(url2, packed)["sha256"] == stats["sha256"]
    # The standard tarfile module and plain webdataset both read it.
    with tarfile.open(url) as tar:
        assert len(tar.getnames()) == 3 * len(schema.MEMBERS)
    raw = list(ds.read_shard(url))
    assert [r["__key__"] for r in raw] == [s.key for s in samples]
    decoded = list(ds.samples())
    assert [d.key for d in decoded] == [s.key for s in samples]
    np.testing.assert_array_equal(decoded[1].render, samples[1].render)
    report = dataset.validate(str(out))
    assert report.ok and report.samples == 3 and report.per_split == {"train": 3}


def test_validate_catches_faults(tmp_path):
    out = tmp_path / "ds"
    s = make_sample()
    ds = Dataset(str(out))
    url = ds.shard_url("val", 1, 0)   # a train sample filed under val
    ds.write_shard(url, [(s.key, schema.encode_sample(s))])
    report = dataset.validate(str(out))
    assert not report.ok and any("split" in f for f in report.faults)

    # A shard without a commit marker, and a broken member.
    members = schema.encode_sample(make_sample(split="train"))
    members["expression.npy"] = b"junk"
    bad = out / "train" / "shard-v001-000000.tar"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(shards.finish_tar([schema.pack_sample(s.key, members)]))
    report = dataset.validate(str(out))
    text = "\n".join(report.faults)
    assert "no stats file" in text and "cannot decode" in text


def test_tar_with_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        data = b"x"
        info = tarfile.TarInfo("../../etc/000001-000002.source.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(shards.ShardError, match="unsafe"):
        list(dataset.read_shard(str(evil)))
    assert not dataset.validate(str(evil)).ok
    assert not (tmp_path.parent.parent / "etc").exists()


def test_card_and_content_hash(tmp_path):
    ds = Dataset(str(tmp_path))
    assert ds.read_card() is None
    card = {"versions": [{"version": 1}]}
    ds.write_card(card)
    assert ds.read_card() == card
    ds.commit_plan({"version": 1, "videos": [{"content_hash": "h1"}]})
    ds.commit_plan({"version": 1, "videos": [{"content_hash": "h1"}]})  # the same plan again: fine
    with pytest.raises(dataset.DatasetError):
        ds.commit_plan({"version": 1, "videos": [{"content_hash": "h2"}]})
    assert ds.plan_versions() == [1] and ds.planned_hashes() == {"h1"} and ds.planned_hashes(below=1) == set()
    a = dataset.content_hash_of([{"path": "a", "sha256": "1"}, {"path": "b", "sha256": "2"}])
    b = dataset.content_hash_of([{"path": "b", "sha256": "2"}, {"path": "a", "sha256": "1"}])
    c = dataset.content_hash_of([{"path": "b", "sha256": "3"}, {"path": "a", "sha256": "1"}])
    assert a == b != c
