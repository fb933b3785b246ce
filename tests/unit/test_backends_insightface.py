"""insightface pack (SCRFD + ArcFace) on ONNX models exported here from small torch modules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnx  # noqa: F401 - required: the test models are built with it
import onnxruntime  # noqa: F401
import torch

from rigface.face.backends import WeightFileMissing, WeightFormatError, make_arcface, make_scrfd  # noqa: E402
from rigface.face.config import FaceConfig  # noqa: E402

DET = 160  # the test detector's input side (the real packs run at 640)


class TinySCRFD(torch.nn.Module):
    """SCRFD's output layout (3 strides x score/bbox/kps, 2 anchors per cell, batched (1, N, C) tensors).

    Score at stride 16 is high where the pooled image is bright; strides 8 and 32 never fire. Box distances
    are a constant 4 (x stride) and keypoints a constant offset, so decoding can be checked exactly.
    """

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList()
        for stride in (8, 16, 32):
            pool = torch.nn.AvgPool2d(stride, stride)
            score = torch.nn.Conv2d(3, 2, 1)
            box = torch.nn.Conv2d(3, 8, 1)
            kps = torch.nn.Conv2d(3, 20, 1)
            with torch.no_grad():
                for conv in (score, box, kps):
                    conv.weight.zero_()
                if stride == 16:
                    score.weight.fill_(20.0 / 3)
                    score.bias.zero_()
                else:
                    score.bias.fill_(-20.0)
                box.bias.fill_(4.0)
                kps.bias.copy_(torch.tensor([-1.0, -1, 1, -1, 0, 0, -0.5, 1, 0.5, 1] * 2))
            self.heads.append(torch.nn.ModuleList([pool, score, box, kps]))

    def forward(self, x):
        scores, boxes, kpss = [], [], []
        for pool, score, box, kps in self.heads:
            p = pool(x)
            scores.append(torch.sigmoid(score(p)).permute(0, 2, 3, 1).reshape(1, -1, 1))
            boxes.append(box(p).permute(0, 2, 3, 1).reshape(1, -1, 4))
            kpss.append(kps(p).permute(0, 2, 3, 1).reshape(1, -1, 10))
        return (*scores, *boxes, *kpss)


class TinyArcFace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, 8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 512)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _export(module, shape, path, dynamic=False):
    names = [f"out{i}" for i in range(9)] if isinstance(module, TinySCRFD) else ["fc1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), dynamo=False, input_names=["input.1"],
                          output_names=names, dynamic_axes={"input.1": {2: "h", 3: "w"}} if dynamic else None)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    torch.manual_seed(0)
    (root / "antelopev2").mkdir()
    _export(TinySCRFD(), (1, 3, DET, DET), root / "antelopev2" / "scrfd_10g_bnkps.onnx", dynamic=True)
    _export(TinyArcFace(), (1, 3, 112, 112), root / "antelopev2" / "glintr100.onnx")
    (root / "custom").mkdir()  # unknown file names: found by their inputs/outputs, as insightface does
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (root / "custom" / name.replace("scrfd_10g_bnkps", "a").replace("glintr100", "b")).write_bytes(
            (root / "antelopev2" / name).read_bytes())
    return root


def _face_image(side: int) -> np.ndarray:
    """Black image with a white square over the stride-16 cells (4..5, 6..7) of the detector's input."""
    img = np.zeros((side, side, 3), np.uint8)
    k = side / DET
    img[int(64 * k) : int(96 * k), int(96 * k) : int(128 * k)] = 255
    return img


@pytest.mark.parametrize("side", [DET, 2 * DET])
def test_scrfd_decodes_boxes_and_keypoints(packs, side):
    det = make_scrfd(FaceConfig(detector="insightface", weights=str(packs), insightface_det_size=DET))
    assert det.use_kps and det.fmc == 3 and det.size == (DET, DET)
    dets = det.detect(_face_image(side))
    assert len(dets) == 1  # eight overlapping anchors, one face after NMS
    d = dets[0]
    k = side / DET
    x0, y0, x1, y1 = d.box
    assert x1 - x0 == pytest.approx(128 * k, abs=1e-3) and y1 - y0 == pytest.approx(128 * k, abs=1e-3)
    cx, cy = (x0 + x1) / 2 / k, (y0 + y1) / 2 / k  # an anchor centre of the bright cells, in input pixels
    assert cx in (96.0, 112.0) and cy in (64.0, 80.0)
    assert d.score > 0.99
    expected = np.array([[-1, -1], [1, -1], [0, 0], [-0.5, 1], [0.5, 1]]) * 16 * k + np.array([cx, cy]) * k
    np.testing.assert_allclose(d.keypoints, expected, atol=1e-3)
    assert det.detect(np.zeros((side, side, 3), np.uint8)) == []


def test_arcface_embeds_aligned_faces(packs):
    emb = make_arcface(FaceConfig(identity="arcface", weights=str(packs), insightface_det_size=DET))
    assert emb.dim == 512 and emb.size == 112 and (emb.mean, emb.std) == (127.5, 127.5)
    rng = np.random.default_rng(0)
    face = _face_image(DET)
    face[64:96, 96:128] = rng.integers(100, 255, (32, 32, 3), dtype=np.uint8)
    a = emb.embed(face)
    assert a.shape == (512,) and a.dtype == np.float32 and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(emb.embed(face.copy()), a, atol=1e-6)
    other = face.copy()
    other[64:96, 96:128] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert np.linalg.norm(emb.embed(other) - a) > 1e-3
    # Alignment maps the detected five points onto ArcFace's template: a bright dot at each lands there.
    kps = emb.detector.detect(face)[0].keypoints
    dots = np.zeros_like(face)
    for x, y in kps:
        dots[int(round(y)), int(round(x))] = 255
    aligned = emb.align(dots, kps)
    from rigface.face.backends.insightface import ARCFACE_TEMPLATE

    for tx, ty in ARCFACE_TEMPLATE:
        patch = aligned[int(ty) - 4 : int(ty) + 5, int(tx) - 4 : int(tx) + 5]
        assert patch.max() > 0


def test_pack_models_found_by_their_layout(packs):
    from rigface.face.backends.insightface import classify, pack_files

    files = pack_files(str(packs / "custom"))
    assert files.detector.name == "a.onnx" and files.recogniser.name == "b.onnx"
    assert classify(files.detector) == "detector" and classify(files.recogniser) == "recogniser"


def test_missing_or_broken_pack_is_named(packs, tmp_path):
    with pytest.raises(WeightFileMissing, match="nowhere"):
        make_scrfd(FaceConfig(detector="insightface", weights=str(tmp_path), insightface_pack="nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightFileMissing, match="no .onnx files"):
        make_scrfd(FaceConfig(detector="insightface", weights=str(tmp_path), insightface_pack="empty"))
    (tmp_path / "only_rec").mkdir()
    (tmp_path / "only_rec" / "glintr100.onnx").write_bytes((packs / "antelopev2" / "glintr100.onnx").read_bytes())
    with pytest.raises(WeightFileMissing, match="no detection model"):
        make_arcface(FaceConfig(identity="arcface", weights=str(tmp_path), insightface_pack="only_rec"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "det_10g.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(WeightFormatError, match="det_10g.onnx"):
        make_scrfd(FaceConfig(detector="insightface", weights=str(tmp_path), insightface_pack="broken"))


def test_paper_crop_is_the_authors_square_around_the_box_centre():
    from rigface.face.backends.insightface import PAPER_CROP_SCALE, paper_crop, paper_crop_matrix

    assert PAPER_CROP_SCALE == pytest.approx(2.1818, abs=1e-4)
    box = (200.0, 150.0, 300.0, 290.0)  # w 100, h 140: only the width sets the side
    m = paper_crop_matrix(box)
    # The authors' construction: the square of half-side 0.75 w around the box centre lands on [80, 432].
    cx, cy, h = 250.0, 220.0, 75.0
    corners = np.array([[cx - h, cy - h], [cx - h, cy + h], [cx + h, cy + h], [cx + h, cy - h]])
    np.testing.assert_allclose(corners @ m[:, :2].T + m[:, 2], [[80, 80], [80, 432], [432, 432], [432, 80]], atol=1e-9)
    assert m[0, 1] == m[1, 0] == 0.0  # no rotation
    img = np.zeros((480, 640, 3), np.uint8)
    img[218:223, 248:253] = 255  # a dot on the box centre
    crop, m2, square = paper_crop(img, box)
    np.testing.assert_array_equal(m2, m)
    ys, xs = np.nonzero(crop[..., 0] > 127)
    assert abs(xs.mean() - 256) < 2 and abs(ys.mean() - 256) < 2
    assert square[2] - square[0] == pytest.approx(PAPER_CROP_SCALE * 100, abs=1) and square[3] - square[1] == square[2] - square[0]
    assert (square[0] + square[2]) / 2 == pytest.approx(cx, abs=1) and (square[1] + square[3]) / 2 == pytest.approx(cy, abs=1)
    with pytest.raises(ValueError, match="no width"):
        paper_crop_matrix((10, 10, 10, 50))
