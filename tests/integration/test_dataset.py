"""The dataset on the real local S3 (SeaweedFS): overwrite safety, the writer lease, resumed reads."""

from __future__ import annotations

import json
import time

import pytest

from rigface.data import dataset, storage
from rigface.data.dataset import Dataset, DatasetError, LeaseHeldError
from rigface.data.schema import encode_sample
from shard_media import synthetic_pair, write_synthetic_shards

pytestmark = pytest.mark.integration


def test_overwrite_deletes_only_a_dataset_it_recognises(stack, s3_prefix):
    write_synthetic_shards(s3_prefix, n_shards=2, per_shard=2)
    ds = Dataset(s3_prefix)
    ds.write_card({"latest": 1})
    ds.commit_plan({"version": 1, "videos": []})
    storage.write_text(ds.join("index/v001.jsonl"), "")
    # Something else in the folder (source videos, say): nothing at all is deleted.
    storage.write_bytes(storage.join(s3_prefix, "videos/a.mp4"), b"not ours")
    before = storage.list_urls(s3_prefix)
    with pytest.raises(DatasetError, match="not part of a dataset.*videos/a.mp4"):
        ds.delete()
    assert storage.list_urls(s3_prefix) == before
    # A bucket root is never a dataset, whatever it holds.
    for root in (f"s3://{stack.bucket}", f"s3://{stack.bucket}/"):
        with pytest.raises(DatasetError, match="bucket"):
            Dataset(root).delete()
    assert storage.list_urls(s3_prefix) == before
    # Without the stranger it goes, all of it (card, plan, index, shards, stats).
    storage.delete(storage.join(s3_prefix, "videos/a.mp4"))
    assert ds.delete() == len(before) - 1
    assert storage.list_urls(s3_prefix) == []


def test_overwrite_reports_every_key_it_could_not_delete(tmp_path):
    import subprocess

    root = tmp_path / "ds"
    write_synthetic_shards(str(root), n_shards=3, per_shard=1)
    stuck = [root / "train" / "shard-v001-000000.tar", root / "train" / "shard-v001-000002.stats.json"]
    # Immutable files cannot be unlinked, even by root (chmod on the folder would not stop root).
    if subprocess.run(["chattr", "+i", *map(str, stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(DatasetError, match="2 object") as err:
            Dataset(str(root)).delete()
    finally:
        subprocess.run(["chattr", "-i", *map(str, stuck)], check=True)
    for path in stuck:
        assert str(path) in str(err.value)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(p.name for p in stuck)


def test_second_writer_fails_fast_naming_the_holder_and_a_dead_writers_lease_expires(stack, s3_prefix):
    ds = Dataset(s3_prefix)
    first = ds.lease("run one", ttl_s=3).acquire()
    t = time.monotonic()
    with pytest.raises(LeaseHeldError, match="held by 'run one'"):
        ds.lease("run two").acquire()
    assert time.monotonic() - t < 5
    # While the holder runs, its renewals keep the lease alive past its ttl.
    time.sleep(4)
    with pytest.raises(LeaseHeldError):
        ds.lease("run two").acquire()
    # The holder is killed: it stops renewing and never releases. After the ttl the lease is taken over.
    first._stop.set()
    first._thread.join()
    time.sleep(3.5)
    second = ds.lease("run two", ttl_s=30).acquire()
    assert json.loads(storage.read_text(ds.lease_url))["owner"] == "run two"
    first.renew()  # the killed run coming back finds the lease gone and stops at its next commit
    with pytest.raises(LeaseHeldError):
        first.check()
    with pytest.raises(LeaseHeldError):
        ds.write_shard(ds.shard_url("train", 1, 0), [], lease=first)
    assert not ds.is_committed(ds.shard_url("train", 1, 0))
    second.release()
    assert not storage.exists(ds.lease_url)


class FailAfter:
    """Wraps a real S3 response body: raises a dropped-connection error once ``n`` bytes have been read."""

    def __init__(self, body, n: int) -> None:
        self.body, self.left = body, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            from urllib3.exceptions import ProtocolError

            raise ProtocolError("Connection broken: IncompleteRead")
        data = self.body.read(min(size, self.left) if size and size > 0 else self.left)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.body.close()


def test_a_read_that_fails_mid_stream_resumes_where_it_stopped(stack, s3_prefix, monkeypatch):
    ds = Dataset(s3_prefix)
    pairs = [synthetic_pair("v", i, i + 10, size=64) for i in range(6)]
    url = ds.shard_url("train", 1, 0)
    ds.write_shard(url, [(p.key, encode_sample(p)) for p in pairs])
    size = storage.size(url)
    calls = []
    real = storage._get_body

    def flaky(u, start, etag):
        body, tag = real(u, start, etag)
        calls.append(start)
        return (FailAfter(body, size // 2) if len(calls) == 1 else body), tag

    monkeypatch.setattr(storage, "_get_body", flaky)
    keys = [s["__key__"] for s in ds.read_shard(url)]
    assert keys == [p.key for p in pairs]  # nothing lost, nothing twice
    assert calls[0] == 0 and calls[1] == size // 2 and len(calls) == 2  # reopened at the byte it reached
    assert dataset.validate(url).ok
