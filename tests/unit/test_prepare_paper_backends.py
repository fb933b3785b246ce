"""`rigface prepare` end to end with the paper's backends (insightface + DECA + Deep3DFaceRecon + BiSeNet) on
random-weight files of the true formats: the shards validate and name what made them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io as scipy_io
import torch

import media  # tests/ is on pythonpath (pyproject)
from test_backends import _bfm_dict
from test_backends_deca_fit import _bias, _codes, write_deca_assets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 384
STRIDE = 16


class FixedSCRFD(torch.nn.Module):
    """SCRFD's output layout at a fixed input size, firing at one stride-16 cell with a given box and points."""

    def __init__(self, size: int, cell: tuple[int, int], dist: np.ndarray, kps: np.ndarray):
        super().__init__()
        self.size = size
        logits = torch.full((size // STRIDE, size // STRIDE, 2), -20.0)
        logits[cell[1], cell[0]] = 20.0
        self.register_buffer("logits", logits.reshape(1, -1, 1))
        self.register_buffer("dist", torch.tensor(dist, dtype=torch.float32).repeat(2))
        self.register_buffer("kps", torch.tensor(kps, dtype=torch.float32).reshape(-1).repeat(2))

    def forward(self, x):
        zero = x.mean() * 0.0  # keeps the input in the graph
        outs = []
        for stride in (8, 16, 32):
            n = (self.size // stride) ** 2
            score = self.logits if stride == STRIDE else torch.full((1, n * 2, 1), -20.0)
            outs.append(torch.sigmoid(score + zero))
        for stride in (8, 16, 32):
            n = (self.size // stride) ** 2
            outs.append(self.dist.reshape(1, 1, 8).expand(1, n, 8).reshape(1, n * 2, 4) + zero)
        for stride in (8, 16, 32):
            n = (self.size // stride) ** 2
            outs.append(self.kps.reshape(1, 1, 20).expand(1, n, 20).reshape(1, n * 2, 10) + zero)
        return tuple(outs)


def _light(state: dict) -> dict:
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if v.dim() else v.clone() for k, v in state.items()}


def write_paper_weights(root: Path, image: np.ndarray, det_size: int) -> dict:
    """A weights folder as the paper's, every file in its published format (small random or zero weights); the
    detector fires where YuNet finds the face in ``image`` (as SCRFD at ``det_size`` would see it). The Deep3D file
    regresses the expression ``exp`` (coefficients 80:144) whatever the input."""
    from rigface.face.backends.bisenet import BiSeNet
    from rigface.face.backends.deca import DecaEncoder
    from rigface.face.backends.deep3d import FACE_ADAPTER, ReconNet
    from rigface.face.detect import YuNetDetector

    torch.manual_seed(0)
    d3d = _light(ReconNet(FACE_ADAPTER).state_dict())
    exp = torch.linspace(-1, 1, 64)
    d3d["fianl_layers.1.bias"] = exp
    torch.save(d3d, root / "d3dfr_res50_nofc.pth")
    scipy_io.savemat(root / "BFM_model_front.mat", _bfm_dict())
    deca = _light(DecaEncoder().state_dict())
    deca["layers.2.weight"] = torch.zeros(236, 1024)
    deca["layers.2.bias"] = _bias(_codes(tex=np.linspace(-1, 1, 50)))
    torch.save({"E_flame": deca, "E_detail": {}, "D_detail": {}}, root / "deca_model.tar")
    write_deca_assets(root)
    torch.save(BiSeNet().state_dict(), root / "79999_iter.pth")
    # The detector: SCRFD's layout, firing where YuNet finds the face, in SCRFD's letterboxed input pixels.
    h, w = image.shape[:2]
    scale = (det_size / h if h >= w else int(det_size * h / w) / h)
    det = YuNetDetector().detect(image)[0]
    x0, y0, x1, y1 = np.asarray(det.box) * scale
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cell = (int(cx // STRIDE), int(cy // STRIDE))
    anchor = np.array(cell) * STRIDE
    dist = np.array([anchor[0] - x0, anchor[1] - y0, x1 - anchor[0], y1 - anchor[1]]) / STRIDE
    kps = (det.keypoints * scale - anchor) / STRIDE
    (root / "antelopev2").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FixedSCRFD(det_size, cell, dist, kps).eval(), (torch.zeros(1, 3, det_size, det_size),),
                          str(root / "antelopev2" / "scrfd_10g_bnkps.onnx"), dynamo=False, input_names=["input.1"],
                          output_names=[f"out{i}" for i in range(9)])
    return {"root": root, "exp": exp.numpy(), "box": tuple(float(v) for v in det.box)}


@pytest.fixture(scope="module")
def paper_weights(tmp_path_factory):
    return write_paper_weights(tmp_path_factory.mktemp("paper_weights"), media.scene(SIZE, scale=1.0), SIZE)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_env import start_local_ray

    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray
    ray.shutdown()


def test_rigface_prepare_with_the_paper_backends_writes_valid_shards(paper_weights, ray_local, tmp_path):
    from rigface.cli import main
    from rigface.data import dataset

    source = tmp_path / "videos"
    media.face_video(source / "clip.mp4", n_frames=25, fps=10, size=SIZE, scale=1.0)
    out = tmp_path / "shards"
    overrides = [f"face.weights={paper_weights['root']}", "face.detector=insightface", "face.fit=deca",
                 "face.expression=deep3d", "face.mask=bisenet", f"face.insightface_det_size={SIZE}",
                 "prepare.pairs_per_video=2", "prepare.min_gap_seconds=1.0", "prepare.val_fraction=0.0"]
    argv = ["prepare", "--source", str(source), "--output", str(out)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0
    report = dataset.validate(str(out))
    assert report.ok, report.faults
    assert report.samples == 2
    for sample in dataset.iter_samples(str(out)):
        text = json.dumps(sample.meta)
        assert "deca:deca_model.tar" in text and "deep3d:face_adapter/d3dfr_res50_nofc.pth@256" in text
        assert '"crop": "paper"' in text and "insightface-scrfd" in text
        np.testing.assert_allclose(sample.expression, paper_weights["exp"], atol=1e-5)  # coefficients 80:144
        assert sample.render.shape == (512, 512, 3) and (sample.render.sum(2) > 0).mean() > 0.02
