"""`rigface train` argument handling and the small pure helpers of the training job (no Ray, no model)."""

from __future__ import annotations

import argparse

import pytest

from pipelines.commands import train as train_cmd
from rigface.config import load_config


def parser():
    p = argparse.ArgumentParser()
    train_cmd.register(p.add_subparsers(dest="command"))
    return p


def test_train_subcommand_parses_its_flags():
    args = parser().parse_args(["train", "--data", "s3://b/d", "--max-steps", "7", "--num-workers", "2",
                                "--run-name", "r1"])
    assert (args.data, args.max_steps, args.num_workers, args.run_name) == ("s3://b/d", 7, 2, "r1")
    assert args.func is train_cmd.run


def test_bad_numbers_are_rejected_before_any_work():
    args = parser().parse_args(["train", "--max-steps", "0"])
    assert train_cmd.run(args, load_config()) == 2


def test_missing_data_is_an_error_exit(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    args = parser().parse_args(["train"])
    assert train_cmd.run(args, load_config()) == 1  # TrainError: no training data


def test_params_leave_out_secret_looking_names():
    from pipelines.train_tracking import safe_params

    out = safe_params({"train.lr": 1e-5, "storage.secret_key": "x", "a.api_key": "y", "b.token": "z"})
    assert out == {"train.lr": "1e-05"}


def test_fault_injection_parses_and_targets_one_rank(tmp_path, monkeypatch):
    from pipelines.train import _FaultInjection

    monkeypatch.setenv("RIGFACE_TRAIN_FAULT", f"rank=1,step=3,marker={tmp_path / 'm'}")
    assert _FaultInjection.from_env(0).step == -1
    f = _FaultInjection.from_env(1)
    assert (f.rank, f.step) == (1, 3)
    f.maybe_crash(2)  # not the step: nothing happens
    (tmp_path / "m").write_text("done")
    f.maybe_crash(3)  # marker exists: already happened once, nothing happens


@pytest.mark.parametrize("storage_path,scheme", [(None, "file"), ("s3://bkt/runs", "s3")])
def test_storage_location(tmp_path, monkeypatch, storage_path, scheme):
    from pipelines.train import storage_location

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    sets = [f"storage.state_dir={tmp_path}"] + ([f"train.storage_path={storage_path}"] if storage_path else [])
    uri, fs, path = storage_location(load_config([], sets))
    if scheme == "s3":
        assert uri == "s3://bkt/runs" and path == "bkt/runs" and fs is not None
    else:
        assert uri == str(tmp_path / "runs") and fs is None and (tmp_path / "runs").is_dir()


def test_retention_keeps_latest_and_best_and_leaves_a_marker_in_each_pruned_folder(tmp_path):
    """Ray's run snapshot lists every reported checkpoint; a rerun refuses to start if one of their folders is
    gone, so a pruned checkpoint keeps its folder with a PRUNED marker alone (tests/integration covers the rerun)."""
    from pipelines.train import PRUNED_FILE, STATE_FILE, _checkpoint_names, _prune_checkpoints

    root = tmp_path / "run"
    for step in (2, 4, 6, 8, 10):
        d = root / f"checkpoint_{step:08d}"
        (d / "model").mkdir(parents=True)
        (d / "model" / "weights.safetensors").write_bytes(b"w" * 100)
        (d / STATE_FILE).write_bytes(b"s")
    (root / "checkpoint_manager_snapshot.json").write_text("{}")
    _prune_checkpoints(str(root), keep=2, best={"name": "checkpoint_00000004"})
    assert _checkpoint_names(str(root)) == {"checkpoint_00000004", "checkpoint_00000008", "checkpoint_00000010"}
    for step in (2, 6):
        d = root / f"checkpoint_{step:08d}"
        assert sorted(p.name for p in d.rglob("*") if p.is_file()) == [PRUNED_FILE]
    _prune_checkpoints(str(root), keep=2, best={"name": "checkpoint_00000004"})  # again: nothing changes
    assert (root / "checkpoint_00000002" / PRUNED_FILE).exists()
    assert (root / "checkpoint_manager_snapshot.json").exists()


def _checkpoint_copy(tmp_path):
    import shutil

    local = tmp_path / "local"
    (local / "model").mkdir(parents=True)
    (local / "model" / "weights.safetensors").write_bytes(b"w" * 64)
    (local / "training_state.pt").write_bytes(b"s" * 32)
    remote = tmp_path / "runs" / "r" / "checkpoint_00000008"
    shutil.copytree(local, remote)
    (remote / "training_state.pt").unlink()  # what a soak under load found after Ray's upload
    return local, remote


def test_a_checkpoint_file_lost_in_the_upload_is_uploaded_again(tmp_path, caplog):
    from pipelines.train import _verify_upload

    local, remote = _checkpoint_copy(tmp_path)
    with caplog.at_level("WARNING", logger="pipelines.train"):
        _verify_upload(str(local), str(remote))
    assert (remote / "training_state.pt").read_bytes() == b"s" * 32
    assert "training_state.pt" in caplog.text


def test_a_checkpoint_upload_that_cannot_be_repaired_fails_the_step(tmp_path, monkeypatch):
    from pipelines.train import _verify_upload
    from rigface.data import storage

    local, remote = _checkpoint_copy(tmp_path)
    monkeypatch.setattr(storage, "upload_file", lambda src, dst: None)  # a store that keeps losing it
    with pytest.raises(RuntimeError, match="still lacks"):
        _verify_upload(str(local), str(remote))
