"""Head masks against hand-drawn reference masks (tests/data/head_masks.json) of real photos and frames that
ship in packages: long, straight, shaggy, bob and wavy hair, and a cap. Thresholds sit a little under what
the landmark+colour-prior mask measured (IoU 0.65-0.93, hair recall 0.78-0.99 per image; means 0.83 / 0.91)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import face_media as fm
from rigface.face import FaceFit
from rigface.face.config import FaceConfig


def in_crop(mask: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """A frame-pixel mask mapped into the 512 crop of `box`, and where the crop shows the frame (not padding)."""
    import cv2

    x0, y0, x1, _ = box
    k = 512 / (x1 - x0)
    m = np.float32([[k, 0, -k * x0], [0, k, -k * y0]])
    warp = lambda a: cv2.warpAffine(a.astype(np.uint8), m, (512, 512), flags=cv2.INTER_NEAREST) > 0  # noqa: E731
    return warp(mask), warp(np.ones_like(mask))


@pytest.fixture(scope="module")
def scored():
    from rigface.face import FaceAnalyzer

    an = FaceAnalyzer(FaceConfig())
    rows = {}
    try:
        for name, ref in fm.reference_head_masks().items():
            fit = an.analyze(ref["image"])
            assert isinstance(fit, FaceFit), (name, fit)
            head, valid = in_crop(ref["head"], fit.crop_box)
            hair, _ = in_crop(ref["hair"], fit.crop_box)
            pred = (fit.mask > 0) & valid
            times = []
            for _ in range(5):
                t = time.perf_counter()
                an.masker(fit.crop, fit.landmarks)
                times.append(time.perf_counter() - t)
            rows[name] = {"iou": (pred & head).sum() / (pred | (head & valid)).sum(),
                          "hair_recall": (pred & hair).sum() / max(1, (hair & valid).sum()),
                          "ms": 1000 * float(np.median(times))}
    finally:
        an.close()
    return rows


def test_head_mask_matches_reference_masks(scored):
    assert len(scored) >= 6
    for name, r in scored.items():
        assert r["iou"] > 0.6, (name, r)
        assert r["hair_recall"] > 0.75, (name, r)
    assert np.mean([r["iou"] for r in scored.values()]) > 0.8, scored
    assert np.mean([r["hair_recall"] for r in scored.values()]) > 0.88, scored


def test_long_hair_and_turned_heads_are_covered(scored):
    """The two failures of the GrabCut mask it replaces (long hair below the chin; the hair of a turned head)."""
    assert scored["long_hair_closeup"]["hair_recall"] > 0.85 and scored["long_straight"]["hair_recall"] > 0.9
    assert scored["shaggy_turned"]["hair_recall"] > 0.9 and scored["shaggy_turned"]["iou"] > 0.8


def test_head_mask_is_cheap(scored):
    # ~2-8 ms per 512 crop on one core here (bench/face.py); generous, the CI machine is shared.
    assert np.median([r["ms"] for r in scored.values()]) < 60, scored
