"""`rigface weights check`: a folder laid out as the authors' (random-weight files of the true formats) is read
by headers, checked against the loaders' model definitions, and mapped to the jobs it can run."""

from __future__ import annotations

import json

import pytest
import scipy.io as scipy_io
import torch
from safetensors.torch import save_file

from test_backends import _bfm_dict
from test_backends_deca_fit import write_deca_assets
from test_backends_insightface import DET, TinyArcFace, TinySCRFD, _export


def _light(state: dict) -> dict:
    """The same keys and shapes, stored as one-element storages (stride-0 views): megabytes become bytes."""
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if v.dim() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    from rigface.face.backends.bisenet import BiSeNet
    from rigface.face.backends.deca import DecaEncoder
    from rigface.face.backends.deep3d import FACE_ADAPTER, ReconNet

    root = tmp_path_factory.mktemp("weights")
    sd = root / "stable-diffusion-v1-5"
    for sub, name, body in (("unet", "config.json", {"in_channels": 4, "cross_attention_dim": 768,
                                                      "block_out_channels": [320, 640, 1280, 1280]}),
                            ("vae", "config.json", {}), ("text_encoder", "config.json", {}),
                            ("tokenizer", "vocab.json", {}), ("scheduler", "scheduler_config.json", {})):
        (sd / sub).mkdir(parents=True)
        (sd / sub / name).write_text(json.dumps(body))
    save_file({"conv_in.weight": torch.zeros(320, 4, 3, 3), "conv_in.bias": torch.zeros(320)},
              sd / "unet" / "diffusion_pytorch_model.safetensors")
    for part, conv in (("unet_denoise", 12), ("unet_id", 4)):
        folder = root / "pre_trained" / part / "checkpoint-70000"
        folder.mkdir(parents=True)
        tensors = {"conv_in.weight": torch.zeros(320, conv, 3, 3)}
        if part == "unet_denoise":
            tensors.update({"au_aug_mlp.weight": torch.zeros(1280, 64), "au_aug_mlp.bias": torch.zeros(1280)})
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    (root / "pre_trained" / "unet_id" / "checkpoint-20000").mkdir()  # an older one: the newest is taken
    third = root / "checkpoints" / "third_party"
    third.mkdir(parents=True)
    torch.save({"module." + k: v for k, v in _light(ReconNet(FACE_ADAPTER).state_dict()).items()},
               third / "d3dfr_res50_nofc.pth")
    scipy_io.savemat(third / "BFM_model_front.mat", _bfm_dict(100))
    data = root / "data"
    data.mkdir()
    torch.save({"E_flame": _light(DecaEncoder().state_dict()), "E_detail": {}, "D_detail": {}}, data / "deca_model.tar")
    write_deca_assets(data)
    torch.save(_light(BiSeNet().state_dict()), root / "79999_iter.pth")
    pack = root / "third_party_files" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    _export(TinySCRFD(), (1, 3, DET, DET), pack / "scrfd_10g_bnkps.onnx", dynamic=True)
    _export(TinyArcFace(), (1, 3, 112, 112), pack / "glintr100.onnx")
    return root


def test_the_authors_layout_is_found_checked_and_mapped_to_jobs(weights_root):
    from rigface.weights import check_weights

    report = check_weights(str(weights_root))
    status = {i.name: i.status for i in report.items}
    assert status == {"sd15": "ok", "unet_denoise": "ok", "unet_id": "ok", "deca": "ok", "flame": "ok",
                      "texture": "ok", "uv": "ok", "landmarks": "ok", "bfm": "ok", "deep3d:face_adapter": "ok",
                      "deep3d:deep3d": "missing", "bisenet": "ok", "antelopev2": "ok"}, report.to_dict()
    by = {i.name: i for i in report.items}
    assert by["unet_denoise"].path.endswith("unet_denoise/checkpoint-70000")
    assert "au_aug_mlp (1280, 64)" in by["unet_denoise"].detail
    assert "fianl_layers heads [80, 64, 80, 3, 27, 2, 1, 4]" in by["deep3d:face_adapter"].detail
    assert "E_flame 320 tensors" in by["deca"].detail or "codes 236" in by["deca"].detail
    assert "tex_dir (32, 32, 3, 60)" in by["texture"].detail
    assert all(ready == [] for ready in report.jobs.values()), report.jobs
    assert "face.deca_checkpoint=data/deca_model.tar" in report.overrides
    assert "face.insightface_pack=third_party_files/models/antelopev2" in report.overrides
    assert f"model.pretrained={weights_root}/stable-diffusion-v1-5" in report.overrides
    assert report.ok


def test_broken_and_missing_files_are_named_and_jobs_say_what_they_lack(weights_root, tmp_path):
    import shutil

    from rigface.face.backends.deep3d import FACE_ADAPTER, ReconNet
    from rigface.weights import check_weights

    root = tmp_path / "w"
    shutil.copytree(weights_root / "data", root / "data")
    odd = {k.replace("fianl_layers", "heads"): v for k, v in _light(ReconNet(FACE_ADAPTER).state_dict()).items()}
    torch.save(odd, root / "epoch_20.pth")
    (root / "data" / "FLAME_texture.npz").unlink()
    from rigface.face.backends.bisenet import BiSeNet

    state = {"module." + k: v for k, v in _light(BiSeNet().state_dict()).items()}
    state["module.conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)  # 18 classes: not the published model
    torch.save(state, root / "79999_iter.pth", _use_new_zipfile_serialization=False)  # the 2019 file's format
    report = check_weights(str(root))
    by = {i.name: i for i in report.items}
    assert by["deep3d:deep3d"].status == "bad"
    assert "unexpected keys: heads.0.bias" in " ".join(by["deep3d:deep3d"].problems)
    assert by["texture"].status == "missing" and by["deca"].status == "ok"
    assert by["bisenet"].status == "bad"
    assert "conv_out.conv_out.weight (18, 256, 1, 1) != (19, 256, 1, 1)" in " ".join(by["bisenet"].problems)
    assert set(report.jobs["prepare (paper backends)"]) == {"antelopev2", "texture", "deep3d", "bfm", "bisenet"}
    assert report.jobs["train"] == ["sd15"]
    assert not report.ok


def test_cli_prints_a_table_and_json(weights_root, capsys):
    from rigface.cli import main

    assert main(["weights", "check", str(weights_root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["jobs"]["train"]["ready"] and len(out["items"]) == 13
    assert main(["weights", "check", str(weights_root)]) == 0
    text = capsys.readouterr().out
    assert "deep3d:face_adapter" in text and "what can run" in text and "--set face.weights=" in text


@pytest.mark.integration
def test_the_same_layout_on_s3_is_read_by_ranges(weights_root, stack, s3_prefix, monkeypatch):
    from rigface.data import storage
    from rigface.weights import check_weights

    for f in weights_root.rglob("*"):
        if f.is_file():
            storage.upload_file(f, storage.join(s3_prefix, f.relative_to(weights_root).as_posix()))
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda url, start, n: reads.append(n) or real(url, start, n))
    report = check_weights(s3_prefix)
    assert {i.name: i.status for i in report.items} == {i.name: i.status for i in check_weights(str(weights_root)).items}
    assert all(not need for need in report.jobs.values())
    big = {i.name: i.path for i in report.items if i.name in ("deca", "deep3d:face_adapter", "bisenet")}
    assert all(p.startswith("s3://") for p in big.values())
    assert sum(reads) < 4 << 20  # headers and pickles, not the tensors
