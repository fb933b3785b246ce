"""Model folders on the real local S3 and MLflow: SD-1.5 initialisation from s3://, the authors' release layout
from s3://, a trained model's save/load round trip, and no downloaded copy left behind by any of them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from model_media import write_released_folder, write_tiny_sd_folder
from rigface.data import storage
from rigface.model import ModelConfig, build_rigface, load_rigface, save_rigface

pytestmark = pytest.mark.integration


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Every temporary file or folder made through `tempfile` lands here, so a leftover download shows."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _upload_tree(local: Path, url: str) -> None:
    for f in local.rglob("*"):
        if f.is_file():
            storage.upload_file(f, storage.join(url, f.relative_to(local).as_posix()))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_init_from_stable_diffusion_on_s3(stack, s3_prefix, tmp_path, private_tmp):
    local = write_tiny_sd_folder(tmp_path / "sd15")
    _upload_tree(local, storage.join(s3_prefix, "sd15"))
    from_s3 = build_rigface(ModelConfig(preset="sd15", pretrained=storage.join(s3_prefix, "sd15"), resolution=64))
    from_disk = build_rigface(ModelConfig(preset="sd15", pretrained=str(local), resolution=64))
    _same_weights(from_s3.model, from_disk.model)
    assert torch.equal(from_s3.text_embedding, from_disk.text_embedding)
    assert list(private_tmp.iterdir()) == [], "the downloaded SD-1.5 copy is removed once loaded"


def test_released_layout_loads_from_s3(stack, s3_prefix, tmp_path, private_tmp):
    sd = write_tiny_sd_folder(tmp_path / "sd15")
    cfg = ModelConfig(preset="sd15", pretrained=str(sd), expression_dim=64, resolution=64)
    release = tmp_path / "released"
    shapes = build_rigface(cfg).model
    newest = write_released_folder(release, shapes, seed=3, checkpoint="checkpoint-70000")
    write_released_folder(release, shapes, seed=4, checkpoint="checkpoint-500")
    url = storage.join(s3_prefix, "rigface-release")
    _upload_tree(release, url)
    from_s3 = build_rigface(cfg.model_copy(update={"released": url}))
    from_disk = build_rigface(cfg.model_copy(update={"released": str(release)}))
    _same_weights(from_s3.model, from_disk.model)
    assert torch.equal(from_s3.model.expression_proj.weight, newest["unet_denoise"]["au_aug_mlp.weight"])
    # What `rigface edit --model s3://.../rigface-release` loads: the release on top of model.pretrained.
    pipe = load_rigface(url, model_cfg=cfg)
    _same_weights(pipe.model, from_disk.model)
    assert not pipe.model.training
    assert list(private_tmp.iterdir()) == [], "the downloaded release is removed once loaded"


@pytest.mark.slow  # three loads and two saves: about a minute on 2 shared cores
def test_trained_model_round_trip_on_s3_and_mlflow_leaves_no_copy(stack, s3_prefix, tmp_path, private_tmp):
    import mlflow

    from pipelines.train_tracking import register_model

    c = build_rigface(ModelConfig(preset="tiny", resolution=64))
    url = storage.join(s3_prefix, "model")
    save_rigface(c, url)
    names = [u[len(url) + 1:] for u in storage.list_urls(url)]
    assert "model_index.json" in names and any(n.startswith("model/") for n in names)
    assert not any(n.endswith("rigface.json") for n in names)
    saved = tmp_path / "saved"
    save_rigface(c, str(saved))
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment(f"model-s3-{s3_prefix.rsplit('/', 1)[-1]}")).info.run_id
    client.log_artifacts(run, str(saved), artifact_path="model")
    client.set_terminated(run)
    registered = register_model(client, run, f"rigface-test-{run[:8]}")  # the train job's own registration
    assert registered.startswith("models:/")
    for uri in (url, f"runs:/{run}/model", registered):
        back = load_rigface(uri)
        _same_weights(back.model, c.model)
        assert torch.equal(back.text_embedding.embedding, c.text_embedding)
        back.scheduler.set_timesteps(50)
        assert back.scheduler.timesteps[0] == 999 and abs(float(back.scheduler.sigmas[-1]) - 0.0292) < 1e-4
        assert list(private_tmp.iterdir()) == [], f"a downloaded copy of {uri} was left behind"
