"""SSIM against scikit-image, identity and attribute distances on known values, the report's formats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from skimage import data as skdata
from skimage.metrics import structural_similarity

from rigface.eval.attributes import FitMismatchError, attribute_distances, pose_distance
from rigface.eval.identity import EmbeddingError, identity_distance
from rigface.eval.images import ImageFormatError
from rigface.eval.report import COLUMNS, PAPER_ROW, EvalReport
from rigface.eval.ssim import ssim


def _pair(seed: int = 0, size: int = 96):
    rng = np.random.default_rng(seed)
    a = skdata.astronaut()[:size, 100:100 + size]
    b = np.clip(a.astype(np.float32) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    return a, b


def _sk_ssim(a, b):
    return structural_similarity(a.astype(np.float64) / 255, b.astype(np.float64) / 255, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage(seed):
    a, b = _pair(seed)
    ours = float(ssim(a, b)[0])
    assert ours == pytest.approx(_sk_ssim(a, b), abs=1e-5)
    assert ours < 0.95  # the noise is visible: the comparison is not between two 1.0s


def test_ssim_batch_and_identical():
    a, b = _pair(0)
    c, d = _pair(1)
    batch = ssim(np.stack([a, c, a]), np.stack([b, d, a]))
    assert batch.shape == (3,)
    assert batch[0] == pytest.approx(_sk_ssim(a, b), abs=1e-5)
    assert batch[1] == pytest.approx(_sk_ssim(c, d), abs=1e-5)
    assert batch[2] == pytest.approx(1.0, abs=1e-6)


def test_ssim_float_input_and_bad_input():
    a, b = _pair(0)
    assert ssim(a / 255.0, b / 255.0)[0] == pytest.approx(ssim(a, b)[0], abs=1e-5)
    with pytest.raises(ImageFormatError):
        ssim(a[..., 0], b[..., 0])  # grayscale
    with pytest.raises(ValueError):
        ssim(a, b[:50])  # shapes differ
    with pytest.raises(ValueError):
        ssim(a[:8, :8], b[:8, :8])  # smaller than the window


def test_identity_distance_known_values():
    assert identity_distance([1, 0, 0], [5, 0, 0]) == pytest.approx(0.0)
    assert identity_distance([1, 0], [0, 3]) == pytest.approx(math.sqrt(2))
    assert identity_distance([1, 0], [-2, 0]) == pytest.approx(2.0)
    with pytest.raises(EmbeddingError):
        identity_distance([0, 0], [1, 0])
    with pytest.raises(EmbeddingError):
        identity_distance([1, 0, 0], [1, 0])


class _Pose:
    def __init__(self, yaw, pitch, roll):
        self.v = np.array([yaw, pitch, roll], np.float32)

    def angles(self):
        return self.v


class _Fit:
    def __init__(self, angles=(0, 0, 0), expression=None, lighting=None):
        self.pose = _Pose(*angles)
        self.expression = np.zeros(52, np.float32) if expression is None else np.asarray(expression, np.float32)
        self.lighting = np.zeros((9, 3), np.float32) if lighting is None else np.asarray(lighting, np.float32)


def test_pose_distance_wraps_around():
    assert pose_distance(_Fit((179.0, 0, 0)), _Fit((-179.0, 0, 0))) == pytest.approx(np.deg2rad(2.0) / 3, rel=1e-5)


def test_attribute_distances_known_values():
    a = _Fit((0, 0, 0))
    expr = np.zeros(52, np.float32)
    expr[[3, 7]] = [0.3, 0.4]
    light = np.zeros((9, 3), np.float32)
    light[0] = [1.0, 0.0, 0.0]
    b = _Fit((3.0, 4.0, 0.0), expression=expr, lighting=light)
    d = attribute_distances(b, a)
    # mean absolute differences (rigface.face.metrics); pose in radians
    assert d["apd"] == pytest.approx(np.deg2rad(7.0 / 3.0), rel=1e-6)
    assert d["aed"] == pytest.approx(0.7 / 52, rel=1e-6)
    assert d["ald"] == pytest.approx(1.0 / 27, rel=1e-6)
    assert pose_distance(a, a) == 0.0
    with pytest.raises(FitMismatchError):
        attribute_distances(_Fit(expression=np.zeros(64)), a)


def _report():
    return EvalReport(
        metrics={"id_l2": 0.41, "ssim": 0.8, "lpips": 0.1, "fid": 75.5, "apd": 0.03, "aed": 0.07, "ald": None},
        counts={"samples": 10, "id_l2": 9, "ssim": 10, "lpips": 10, "fid": 10, "apd": 8, "aed": 8, "ald": 0},
        skips={"edited_no_face": 2, "identity_failed": 1},
        info={"model": "s3://b/m", "steps": 20},
    )


def test_report_markdown_has_the_paper_columns_and_row():
    md = _report().to_markdown()
    for header, _ in COLUMNS.values():
        assert header in md
    assert "| RigFace (paper, Table 1) | 0.356 | 0.850 | 0.063 | 60.27 | 0.026 | 0.061 | 0.053 |" in md
    assert "| this run | 0.410 | 0.800 | 0.100 | 75.50 | 0.030 | 0.070 | n/a |" in md
    assert "edited_no_face: 2" in md and "Skipped: 3" in md
    assert "biased" in md  # 10 images < 2048: the FID caveat is printed


def test_report_json_round_trip():
    r = _report()
    d = json.loads(r.to_json())
    assert d["paper"] == PAPER_ROW
    assert d["metrics"]["fid"] == 75.5 and d["metrics"]["ald"] is None
    back = EvalReport.from_json(r.to_json())
    assert back.metrics == r.metrics and back.counts == r.counts and back.skips == r.skips
    m = r.mlflow_metrics()
    assert m["eval/fid"] == 75.5 and "eval/ald" not in m and m["eval/count_samples"] == 10.0
    with pytest.raises(ValueError):
        EvalReport(metrics={"psnr": 30.0})
