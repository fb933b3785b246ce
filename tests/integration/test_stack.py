"""The real local stack: S3 through boto3 and storage, MLflow with an artifact, clean shutdown."""

import os
import time
from pathlib import Path

import pytest

from rigface.data import storage
from rigface.stack import LocalStack, apply_stack_env, read_env_file

pytestmark = pytest.mark.integration


def test_s3_roundtrip_multipart_range_list_delete(stack, s3_prefix, tmp_path):
    key = storage.join(s3_prefix, "blob.bin")
    assert not storage.exists(key)
    payload = os.urandom(12 * 1024 * 1024)  # > 8 MB: boto3 switches to multipart
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    storage.upload_file(src, key)
    assert storage.size(key) == len(payload)
    assert storage.read_range(key, 1000, 10) == payload[1000:1010]
    storage.download_file(key, tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == payload
    for i in range(3):
        storage.write_text(storage.join(s3_prefix, "many", f"{i}.json"), str(i))
    listed = storage.list_urls(storage.join(s3_prefix, "many"))
    assert [u.rsplit("/", 1)[1] for u in listed] == ["0.json", "1.json", "2.json"]
    # Folder semantics: a sibling whose name merely starts the same is neither listed nor deleted.
    sibling = storage.join(s3_prefix + "-old", "keep.txt")
    storage.write_text(sibling, "not mine")
    assert storage.list_urls(s3_prefix + "/many") == listed
    assert storage.list_urls(key) == [key], "a URL naming one object lists that object"
    assert storage.delete_prefix(s3_prefix) == 4
    assert storage.read_text(sibling) == "not mine"
    storage.delete(sibling)
    assert storage.list_urls(s3_prefix) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(key)


def test_a_file_lost_from_a_pyarrow_copy_is_found_on_s3(stack, s3_prefix, tmp_path):
    """The check behind checkpoint uploads: a folder copied the way Ray Train copies a checkpoint (pyarrow,
    with our timeouts), one object then lost, one cut short: both named, the rest not."""
    import pyarrow.fs as pafs

    local = tmp_path / "ckpt"
    (local / "model").mkdir(parents=True)
    (local / "model" / "w.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (local / "training_state.pt").write_bytes(os.urandom(1000))
    (local / "model" / "config.json").write_text("{}")
    url = storage.join(s3_prefix, "checkpoint_00000001")
    fs, path = storage.pyarrow_filesystem(url)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert storage.missing_from(local, url) == []
    storage.delete(storage.join(url, "training_state.pt"))
    storage.write_bytes(storage.join(url, "model", "config.json"), b"{ }")
    assert storage.missing_from(local, url) == ["model/config.json", "training_state.pt"]
    storage.delete_prefix(url)


def test_mlflow_run_with_artifact(stack, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(stack.env()["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("stack-test")
    art = tmp_path / "note.txt"
    art.write_text("artifact body")
    with mlflow.start_run() as run:
        mlflow.log_param("p", 3)
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(str(art))
    client = MlflowClient()
    got = client.get_run(run.info.run_id)
    assert got.data.params["p"] == "3"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1.0 / 3]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl"))
    assert Path(local).read_text() == "artifact body"
    # The artifact really lives in the S3 store, not on the server's disk.
    in_s3 = storage.list_urls(f"s3://{stack.bucket}/mlflow")
    assert any(u.endswith("note.txt") for u in in_s3)


def test_up_twice_down_leaves_nothing_and_keeps_data(tmp_path, monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    s = LocalStack(tmp_path / "state", bucket="keep")
    t0 = time.monotonic()
    info = s.up()
    startup = time.monotonic() - t0
    assert s.status()["running"], s.status()
    info2 = s.up()  # harmless
    assert info2.pids == info.pids and info2.ports == info.ports
    env = read_env_file(s.env_file)
    assert env["AWS_ENDPOINT_URL"] == info.s3_endpoint and env["MLFLOW_TRACKING_URI"] == info.mlflow_uri
    environ: dict[str, str] = {}
    assert apply_stack_env(s.state, environ) and environ["AWS_ENDPOINT_URL"] == info.s3_endpoint
    user_set = {"AWS_ACCESS_KEY_ID": "users-own"}
    apply_stack_env(s.state, user_set)
    assert "AWS_ENDPOINT_URL" not in user_set, "a user's S3 settings are never mixed with the stack's"

    monkeypatch.setenv("AWS_ENDPOINT_URL", info.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    storage.write_text("s3://keep/persist.txt", "survives restart")

    pids = list(info.pids.values())
    stopped = s.down()
    assert sorted(stopped) == sorted(pids)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not s.status()["running"]
    assert not s.env_file.exists()

    info3 = s.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", info3.s3_endpoint)
    assert storage.read_text("s3://keep/persist.txt") == "survives restart"
    s.down()
    print(f"stack start-up: {startup:.1f} s")


def test_a_port_taken_between_pick_and_bind_is_picked_again(tmp_path, monkeypatch, caplog):
    """On a busy machine another process can bind a port after `up` picked it and before the server did (the
    volume server died with 'address already in use' when three stacks and Ray clusters started at once)."""
    import socket

    import rigface.stack as stack_mod

    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    taken = thief.getsockname()[1]
    picks = []
    real_pick = stack_mod._free_port

    def racy_pick(avoid, preferred=None):
        # The first start's volume port is the one somebody else just took.
        port = taken if len(picks) == S3_VOLUME_INDEX else real_pick(avoid, preferred)
        picks.append(port)
        return port

    S3_VOLUME_INDEX = stack_mod.S3_PORT_NAMES.index("volume")
    monkeypatch.setattr(stack_mod, "_free_port", racy_pick)
    s = LocalStack(tmp_path / "state", bucket="race")
    try:
        with caplog.at_level("WARNING", logger="rigface.stack"):
            info = s.up()
        assert info.ports["volume"] != taken and s.status()["running"]
        first_start = (s.state / "logs" / "s3.log").read_text().lower()
        assert "address already in use" in first_start or "port allocation failed" in first_start
        assert any("starting again on other ports" in r.getMessage() for r in caplog.records)
        assert len(picks) == 2 * (len(stack_mod.S3_PORT_NAMES) + 1)  # exactly one more start
        assert all(stack_mod.PORT_BAND[0] <= p <= stack_mod.PORT_BAND[1] for p in picks if p != taken)
    finally:
        s.down()
        thief.close()
