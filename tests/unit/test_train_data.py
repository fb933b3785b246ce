"""The training data stream of `rigface train`: disjoint per-rank shards, seeded shuffles, corrupt-shard skips."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipelines import train_data as td
from rigface.data import storage
from rigface.data.dataset import Dataset
from rigface.data.schema import encode_sample
from shard_media import synthetic_pair, write_synthetic_shards


def keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["__key__"]]


@pytest.fixture
def dataset(tmp_path):
    write_synthetic_shards(str(tmp_path), n_shards=4, per_shard=3)
    write_synthetic_shards(str(tmp_path), n_shards=1, per_shard=2, split="val")
    return str(tmp_path)


def test_lists_committed_shards_and_splits(dataset):
    urls = td.list_shards(dataset)
    assert len(urls) == 5
    assert len(td.shards_for_split(urls, "train")) == 4
    assert td.shards_for_split(urls, "val") == [u for u in urls if "/val/" in u[0]]
    assert all(n == (2 if "/val/" in u else 3) for u, n in urls)
    # a tar without its commit marker (an unfinished write) is not trained on
    storage.write_bytes(storage.join(dataset, "train", "shard-v001-000099.tar"), b"partial")
    assert len(td.list_shards(dataset)) == 5


def test_no_shards_is_a_typed_error(tmp_path):
    with pytest.raises(td.TrainDataError):
        td.list_shards(str(tmp_path))


@pytest.mark.parametrize("n_shards,world", [(4, 2), (1, 2), (3, 2)])
def test_ranks_see_disjoint_data_covering_the_epoch(tmp_path, n_shards, world):
    urls = [(u, 4) for u in write_synthetic_shards(str(tmp_path), n_shards=n_shards, per_shard=4)]
    seen = []
    for rank in range(world):
        loader = td.epoch_loader(urls, rank=rank, world=world, epoch=0, seed=1, batch_size=1, resolution=16,
                                 loader_workers=0, shuffle_buffer=4)
        seen.append(set(keys(loader)))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == n_shards * 4


def test_shuffle_is_seeded_and_changes_per_epoch(dataset):
    urls = td.shards_for_split(td.list_shards(dataset), "train")
    kw = dict(rank=0, world=1, seed=3, batch_size=1, resolution=16, loader_workers=0, shuffle_buffer=8)
    a = keys(td.epoch_loader(urls, epoch=0, **kw))
    assert a == keys(td.epoch_loader(urls, epoch=0, **kw))
    assert a != keys(td.epoch_loader(urls, epoch=1, **kw))
    assert sorted(a) == sorted(keys(td.epoch_loader(urls, epoch=1, **kw)))


def test_batches_are_tensors_in_range_at_the_resolution(dataset):
    urls = td.shards_for_split(td.list_shards(dataset), "train")
    loader = td.epoch_loader(urls, rank=0, world=1, epoch=0, seed=0, batch_size=2, resolution=24,
                             loader_workers=1, shuffle_buffer=4)
    batches = list(loader)
    assert len(batches) == 6  # 12 samples, full batches only
    b = batches[0]
    for k in td.IMAGE_KEYS:
        assert tuple(b[k].shape) == (2, 3, 24, 24)
        assert float(b[k].min()) >= -1.0 and float(b[k].max()) <= 1.0
    assert tuple(b["expression"].shape) == (2, 8) and str(b["expression"].dtype) == "torch.float32"


def test_split_filter_uses_meta_when_paths_name_no_split(tmp_path):
    p = [synthetic_pair("mixed", i, i + 5, split="val" if i % 2 else "train") for i in range(6)]
    url = str(tmp_path / "shard-000000.tar")
    Dataset(str(tmp_path)).write_shard(url, [(s.key, encode_sample(s)) for s in p])
    loader = td.epoch_loader([(url, 6)], rank=0, world=1, epoch=0, seed=0, batch_size=1, resolution=16,
                             loader_workers=0, shuffle_buffer=0, split="train")
    assert len(keys(loader)) == 3


def test_corrupt_shard_is_skipped_with_a_warning(dataset, caplog):
    urls = td.shards_for_split(td.list_shards(dataset), "train")
    rng = np.random.default_rng(0)
    storage.write_bytes(urls[1][0], rng.integers(0, 255, 5000, dtype=np.uint8).tobytes())  # garbage
    good = storage.read_bytes(urls[2][0])
    storage.write_bytes(urls[2][0], good[: len(good) // 2])  # truncated mid-sample
    with caplog.at_level(logging.WARNING, logger="pipelines.train_data"):
        got = keys(td.epoch_loader(urls, rank=0, world=1, epoch=0, seed=0, batch_size=1, resolution=16,
                                   loader_workers=0, shuffle_buffer=0))
    assert len(got) >= 6  # the two intact shards at least
    assert all("vidtrain1/" not in k for k in got)
    assert sum("skipping" in r.message for r in caplog.records) >= 2


def test_an_epoch_without_batches_raises_instead_of_spinning(dataset):
    urls = td.shards_for_split(td.list_shards(dataset), "train")
    for u, _ in urls:
        storage.write_bytes(u, b"not a tar at all" * 10)
    it = td.infinite_batches(urls, rank=0, world=1, seed=0, batch_size=1, resolution=16, loader_workers=0,
                             shuffle_buffer=0)
    with pytest.raises(td.TrainDataError):
        next(it)


def test_fixed_batch_is_deterministic(dataset):
    urls = td.shards_for_split(td.list_shards(dataset), "val")
    a = td.fixed_batch(urls, n=2, resolution=16, split="val")
    b = td.fixed_batch(urls, n=2, resolution=16, split="val")
    assert a["__key__"] == b["__key__"] and len(a["__key__"]) == 2
    assert np.array_equal(td.image_from_chw(a["source"][0]), td.image_from_chw(b["source"][0]))


def test_ranks_are_balanced_by_sample_count_and_none_starves():
    refs = [(f"s{i}.tar", n) for i, n in enumerate([3, 2, 3])]  # what is left of 9 shards once empties go
    for epoch in range(4):
        plans = [td.plan_epoch(refs, rank=r, world=2, epoch=epoch, seed=0, batch_size=2) for r in range(2)]
        loads = [sum(dict(refs)[u] for u in p.urls) if p.sample_stride == 1 else None for p in plans]
        assert all(p.sample_stride == 1 for p in plans) and sorted(loads) == [3, 5]
        assert not set(plans[0].urls) & set(plans[1].urls)
    # Whole shards cannot give each rank a batch of 4: every rank reads every shard, every 2nd sample.
    plans = [td.plan_epoch(refs, rank=r, world=2, epoch=0, seed=0, batch_size=4) for r in range(2)]
    assert [p.sample_stride for p in plans] == [2, 2] and [p.sample_offset for p in plans] == [0, 1]
    td.check_enough(refs, world=2, batch_size=4)
    with pytest.raises(td.TrainDataError, match="cannot give 2 worker"):
        td.check_enough(refs, world=2, batch_size=5)


def test_empty_shards_are_left_out(tmp_path):
    ds = Dataset(str(tmp_path))
    ds.write_shard(ds.shard_url("train", 1, 5), [])
    write_synthetic_shards(str(tmp_path), n_shards=1, per_shard=2)
    assert len(ds.shards()) == 2 and [n for _, n in td.list_shards(str(tmp_path))] == [2]
