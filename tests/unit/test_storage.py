import os

import pytest

from rigface.data import storage


def test_parse_url():
    u = storage.parse_url("s3://bucket/a/b.tar")
    assert (u.scheme, u.bucket, u.key) == ("s3", "bucket", "a/b.tar")
    assert storage.join("s3://bucket/a/", "b", "/c.json") == "s3://bucket/a/b/c.json"
    assert storage.parse_url("file:///tmp/x").key == "/tmp/x"
    assert storage.parse_url("/tmp/x").scheme == "file"
    with pytest.raises(ValueError):
        storage.parse_url("gs://bucket/x")
    with pytest.raises(ValueError):
        storage.parse_url("s3:///nobucket")


def test_local_roundtrip(tmp_path):
    root = tmp_path / "root dir ünï"
    url = str(root / "a" / "x.bin")
    assert not storage.exists(url)
    storage.write_bytes(url, b"hello")
    assert storage.exists(url) and storage.read_bytes(url) == b"hello"
    assert storage.size(url) == 5
    assert storage.read_range(url, 1, 3) == b"ell"
    storage.write_text(str(root / "b.txt"), "t")
    assert storage.list_urls(str(root)) == sorted([str(root / "a" / "x.bin"), str(root / "b.txt")])
    assert storage.list_urls(str(root), suffix=".txt") == [str(root / "b.txt")]
    storage.delete(url)
    storage.delete(url)  # twice is fine
    assert not storage.exists(url)
    assert storage.delete_prefix(str(root)) == 1


def test_local_write_is_atomic(tmp_path, monkeypatch):
    url = str(tmp_path / "obj")
    storage.write_bytes(url, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes(url, b"new-but-failed")
    monkeypatch.undo()
    assert storage.read_bytes(url) == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["obj"], "no temp file left behind"


def test_missing_local_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))


def test_retry_gives_up_on_permanent_errors_and_retries_transient(monkeypatch):
    monkeypatch.setenv("RIGFACE_S3_RETRY_SECONDS", "5")
    calls = {"n": 0}

    @storage.retrying
    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("refused")
        return "ok"

    assert flaky() == "ok" and calls["n"] == 3

    @storage.retrying
    def permanent():
        calls["n"] += 1
        raise ValueError("bad request")

    calls["n"] = 0
    with pytest.raises(ValueError):
        permanent()
    assert calls["n"] == 1


def test_conditional_writes_locally(tmp_path):
    url = str(tmp_path / "lease.json")
    assert storage.create_exclusive(url, b"a") is True
    assert storage.create_exclusive(url, b"b") is False
    data, tag = storage.read_with_etag(url)
    assert data == b"a"
    assert storage.replace_if(url, b"c", "stale") is False
    assert storage.replace_if(url, b"c", tag) is True and storage.read_bytes(url) == b"c"
    assert storage.delete_if(url, tag) is False  # the version it names is gone
    assert storage.delete_if(url, storage.read_with_etag(url)[1]) is True and not storage.exists(url)


def test_delete_many_reports_nothing_for_objects_already_gone(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    assert storage.delete_many([str(tmp_path / "a"), str(tmp_path / "never")]) == {}
    assert not (tmp_path / "a").exists()


def test_missing_from_names_files_lacking_or_of_another_size(tmp_path):
    import shutil

    local = tmp_path / "ckpt"
    (local / "model").mkdir(parents=True)
    for rel, data in {"training_state.pt": b"state", "model/a.json": b"{}", "model/b.bin": b"x" * 100}.items():
        (local / rel).write_bytes(data)
    remote = tmp_path / "store" / "ckpt"
    shutil.copytree(local, remote)
    assert storage.missing_from(local, remote) == []
    (remote / "training_state.pt").unlink()
    (remote / "model" / "b.bin").write_bytes(b"x" * 99)  # a cut-off copy
    assert storage.missing_from(local, str(remote) + "/") == ["model/b.bin", "training_state.pt"]
