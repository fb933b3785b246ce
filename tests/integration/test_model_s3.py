"""Model folders on the real local S3: SD-1.5 initialisation from s3:// and a trained model's save/load round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from model_media import write_tiny_sd_folder
from rigface.data import storage
from rigface.model import ModelConfig, build_rigface, load_rigface, save_rigface

pytestmark = pytest.mark.integration


def _temp_downloads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("rigface-weights-*")}


def test_init_from_stable_diffusion_on_s3(stack, s3_prefix, tmp_path):
    local = write_tiny_sd_folder(tmp_path / "sd15")
    for f in local.rglob("*"):
        if f.is_file():
            storage.upload_file(f, storage.join(s3_prefix, "sd15", f.relative_to(local).as_posix()))
    before = _temp_downloads()
    from_s3 = build_rigface(ModelConfig(preset="sd15", pretrained=storage.join(s3_prefix, "sd15"), resolution=64))
    from_disk = build_rigface(ModelConfig(preset="sd15", pretrained=str(local), resolution=64))
    for (k, a), (_, b) in zip(from_s3.model.state_dict().items(), from_disk.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(from_s3.text_embedding, from_disk.text_embedding)
    assert _temp_downloads() == before, "the downloaded SD-1.5 copy is removed once loaded"


def test_trained_model_save_load_round_trip_on_s3(stack, s3_prefix):
    c = build_rigface(ModelConfig(preset="tiny", resolution=64))
    url = storage.join(s3_prefix, "model")
    save_rigface(c, url)
    names = [u[len(url) + 1:] for u in storage.list_urls(url)]
    assert "rigface.json" in names and any(n.startswith("model/") for n in names)
    back = load_rigface(url)
    for (k, a), (_, b) in zip(c.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(c.text_embedding, back.text_embedding)
