"""Face analysis on real photographs shipped in PyPI packages and an mp4 made from them."""

from __future__ import annotations


import numpy as np
import pytest

import face_media as fm

from rigface.face.config import FaceConfig
from rigface.face.types import FaceFit, FaceSkip, PairConditions, SkipReason


@pytest.fixture(scope="module")
def analyzer():
    from rigface.face import FaceAnalyzer

    a = FaceAnalyzer(FaceConfig())
    yield a
    a.close()


@pytest.fixture(scope="module")
def astro_fit(analyzer) -> FaceFit:
    fit = analyzer.analyze(fm.astronaut())
    assert isinstance(fit, FaceFit), fit
    return fit


@pytest.fixture(scope="module")
def video_fits(analyzer, tmp_path_factory):
    path, labels = fm.astronaut_video(tmp_path_factory.mktemp("video") / "astronaut.mp4")
    frames = fm.read_video(path)
    assert len(frames) == len(labels)
    return {label: analyzer.analyze(frame) for label, frame in zip(labels, frames)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max((a | b).sum(), 1))


def _hull_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    import cv2

    m = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(m, cv2.convexHull(np.ascontiguousarray(landmarks[:, :2], np.float32)).astype(np.int32), 255)
    return m


def test_one_face_crop_512_centred(astro_fit):
    fit = astro_fit
    assert fit.crop.shape == (512, 512, 3) and fit.crop.dtype == np.uint8
    assert fit.landmarks.shape == (478, 3) and fit.mesh.shape == (468, 3)
    assert fit.expression.shape == (52,) and fit.expression.dtype == np.float32
    assert fit.lighting.shape == (9, 3) and fit.albedo.shape == (468, 3)
    assert fit.mask.shape == (512, 512) and set(np.unique(fit.mask)) <= {0, 255}
    # The face (landmark centroid) sits near the crop centre, and fills a sensible share of it.
    cx, cy = fit.landmarks[:, :2].mean(0)
    assert abs(cx - 256) < 0.08 * 512 and abs(cy - 256) < 0.12 * 512
    width = np.ptp(fit.landmarks[:, 0])
    assert 0.25 * 512 < width < 0.6 * 512
    # The crop box is a square around the YuNet face box (178..268, 62..176 in the photo).
    x0, y0, x1, y1 = fit.crop_box
    assert x1 - x0 == y1 - y0 and x0 < 178 and x1 > 268 and y0 < 62 and y1 > 176
    assert fit.scores["detection"] > 0.8 and fit.backends["detector"].startswith("yunet")
    meta = fit.to_meta()
    import json

    assert json.loads(json.dumps(meta))["pose"]["yaw"] == pytest.approx(fit.pose.yaw)


def test_crop_content_matches_frame(astro_fit):
    """The crop is the crop box of the frame resized to 512; a box that would poke out of the photo's top is
    slid down inside the frame instead of being padded."""
    import cv2

    x0, y0, x1, y1 = astro_fit.crop_box
    img = fm.astronaut()
    assert 0 == y0 and 0 <= x0 and x1 <= img.shape[1] and y1 <= img.shape[0]
    assert astro_fit.scores["padded_fraction"] == 0.0
    ref = cv2.resize(img[y0:y1, x0:x1], (512, 512), interpolation=cv2.INTER_AREA if x1 - x0 > 512 else cv2.INTER_CUBIC)
    assert np.abs(ref.astype(int) - astro_fit.crop.astype(int)).mean() < 3


def test_flip_negates_yaw_and_roll(analyzer, astro_fit):
    flipped = analyzer.analyze(fm.astronaut()[:, ::-1])
    assert isinstance(flipped, FaceFit)
    assert flipped.pose.yaw == pytest.approx(-astro_fit.pose.yaw, abs=4.0)
    assert flipped.pose.roll == pytest.approx(-astro_fit.pose.roll, abs=3.0)
    assert flipped.pose.pitch == pytest.approx(astro_fit.pose.pitch, abs=3.0)


def test_video_frames_found_and_pose_follows_rotation(video_fits):
    assert all(isinstance(f, FaceFit) for f in video_fits.values()), video_fits
    still, rot = video_fits["still"], video_fits["rotated"]
    # 15 degrees counter-clockwise in the image = roll -15 (roll is positive clockwise).
    assert rot.pose.roll - still.pose.roll == pytest.approx(-15.0, abs=3.0)
    assert rot.pose.yaw == pytest.approx(still.pose.yaw, abs=4.0)
    # Moved frame: the crop box follows the face; crops stay normalised (face centred, same size).
    moved = video_fits["moved"]
    dx = moved.crop_box[0] - still.crop_box[0]
    dy = moved.crop_box[1] - still.crop_box[1]
    assert dx == pytest.approx(24, abs=14)
    assert dy == pytest.approx(16, abs=14) or still.crop_box[1] == moved.crop_box[1] == 0  # held inside the frame
    assert moved.pose.yaw == pytest.approx(still.pose.yaw, abs=3.0)
    # Scaled 1.25x: the crop box grows with the face, the face keeps its size in the crop.
    sc = video_fits["scaled"]
    ratio = (sc.crop_box[2] - sc.crop_box[0]) / (still.crop_box[2] - still.crop_box[0])
    assert ratio == pytest.approx(1.25, abs=0.15)
    assert sc.pose.scale == pytest.approx(still.pose.scale, rel=0.15)


def test_crop_box_stable_under_jitter(analyzer):
    """Detector jitter of a pixel or two between video frames leaves the crop box as it is."""
    img = fm.astronaut()
    boxes = [analyzer.analyze(fm.shifted(img, d, 0)).crop_box for d in (0, 1)]
    assert boxes[0] == boxes[1]


def test_relit_frame_moves_lighting_towards_the_light(video_fits):
    still, lit = video_fits["still"], video_fits["relit"]
    # Light from the image's right: the SH x band (index 3; view x = image right) rises in every channel.
    # (every channel rises; by > 0.1 on average: the in-frame crop holds less of the ramp than a padded one did)
    rise = lit.lighting[3] - still.lighting[3]
    assert (rise > 0.05).all() and rise.mean() > 0.1, (still.lighting[3], lit.lighting[3])
    from rigface.face import lighting_distance

    assert lighting_distance(still, lit) > lighting_distance(still, still) == 0.0


def test_render_overlaps_face_and_mask(astro_fit):
    """The render of the fit with its own pose and lighting covers the face and the skull above it.

    Thresholds: the render is the 468-vertex face grown over forehead, skull and jaw (rigface.face.head); the
    mask is the whole head with hair and neck, so the render must lie inside the mask (>= 95%) and hold the
    landmark face oval (>= 99% of it). Its IoU with the head mask is the head/mask area ratio (0.47 here):
    >= 0.3 guards against a render in the wrong place (the face alone gave 0.3-0.5 before).
    """
    from rigface.face import render_fit

    render = render_fit(astro_fit, astro_fit, astro_fit)
    cover = render.max(2) > 0
    hull = _hull_mask(astro_fit.landmarks, 512) > 0
    assert (cover & (astro_fit.mask > 0)).sum() / cover.sum() >= 0.95
    assert (cover & hull).sum() / hull.sum() >= 0.99
    assert _iou(cover, astro_fit.mask) >= 0.3
    # Lambertian with the fitted lighting and the skin-model albedo reproduces the face's colours roughly.
    face = hull & (astro_fit.mask > 0)
    err = np.abs(render[face].astype(float) - astro_fit.crop[face].astype(float)).mean()
    assert err < 30, err


def test_head_mask_holds_hair_and_not_the_sky(astro_fit):
    lm = astro_fit.landmarks
    top = int(lm[:, 1].min())
    cx = int(lm[:, 0].mean())
    # hair just above the forehead is head; the top corners of the crop are background
    assert astro_fit.mask[max(top - 20, 0), cx] == 255
    assert astro_fit.mask[30, 10] == 0 and astro_fit.mask[30, 500] == 0


@pytest.mark.parametrize(
    "frame, reason",
    [
        (fm.no_face(), {SkipReason.no_face, SkipReason.low_confidence}),
        (None, {SkipReason.bad_image}),
        (np.zeros((0, 0, 3), np.uint8), {SkipReason.bad_image}),
        (np.zeros((10,), np.uint8), {SkipReason.bad_image}),
        (np.full((64, 64, 3), np.nan, np.float32), {SkipReason.bad_image}),
        ("not an image", {SkipReason.bad_image}),
        (np.zeros((480, 640, 3), np.uint8), {SkipReason.no_face}),
    ],
    ids=["coffee", "none", "empty", "1d", "nan", "string", "black"],
)
def test_bad_or_faceless_input_gives_typed_skip(analyzer, frame, reason):
    out = analyzer.analyze(frame)
    assert isinstance(out, FaceSkip) and out.reason in reason, out


def test_other_layouts_accepted(analyzer, astro_fit):
    img = fm.astronaut()
    gray = analyzer.analyze(fm.cameraman_gray())
    assert isinstance(gray, (FaceFit, FaceSkip))
    assert isinstance(gray, FaceFit) and gray.crop.shape == (512, 512, 3)  # the cameraman's face is found
    gray1 = analyzer.analyze(img.mean(2, keepdims=True).astype(np.uint8))
    assert isinstance(gray1, FaceFit)
    rgba = analyzer.analyze(np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], 2))
    assert isinstance(rgba, FaceFit) and rgba.crop_box == astro_fit.crop_box
    floats = analyzer.analyze(img.astype(np.float32) / 255.0)
    assert isinstance(floats, FaceFit)
    import cv2

    huge = cv2.resize(img, (4096, 4096), interpolation=cv2.INTER_LINEAR)
    big = analyzer.analyze(huge)
    assert isinstance(big, FaceFit) and big.crop.shape == (512, 512, 3)
    assert big.crop_box[0] == pytest.approx(astro_fit.crop_box[0] * 8, abs=8 * 16)


def test_multi_face_policy_and_min_size(analyzer):
    from rigface.face import FaceAnalyzer

    img = fm.astronaut()
    small = np.asarray(__import__("cv2").resize(img, (256, 256)))
    pair = np.concatenate([img, np.pad(small, ((0, 256), (0, 0), (0, 0)))], 1)  # a big and a small face
    largest = analyzer.analyze(pair)
    assert isinstance(largest, FaceFit) and largest.crop_box[2] < 512 + 40  # the big face on the left
    skipper = FaceAnalyzer(FaceConfig(multi_face="skip"))
    try:
        out = skipper.analyze(pair)
        assert isinstance(out, FaceSkip) and out.reason is SkipReason.several_faces
    finally:
        skipper.close()
    tiny = analyzer.analyze(np.asarray(__import__("cv2").resize(img, (160, 160))))
    assert isinstance(tiny, FaceSkip) and tiny.reason is SkipReason.too_small


def test_build_conditions_follow_the_rules(analyzer, astro_fit, video_fits):
    from rigface.face import build_conditions

    src, tgt = astro_fit, video_fits["rotated"]
    expr = build_conditions(src, tgt, "expression")
    assert isinstance(expr, PairConditions)
    np.testing.assert_array_equal(expr.expression, tgt.expression)
    gray = np.all(expr.background == 127, axis=2)
    assert gray[src.mask > 0].all() and not gray[(src.mask == 0) & (tgt.mask > 0)].all()
    pose = build_conditions(src, tgt, "pose")
    np.testing.assert_array_equal(pose.expression, src.expression)
    assert np.all(pose.background[(src.mask > 0) | (tgt.mask > 0)] == 127)
    outside = (src.mask == 0) & (tgt.mask == 0)
    np.testing.assert_array_equal(pose.background[outside], src.crop[outside])
    # The pose render matches the target's face placement better than the source's.
    cover = pose.render.max(2) > 0
    assert _iou(cover, _hull_mask(tgt.landmarks, 512)) > _iou(cover, _hull_mask(src.landmarks, 512))
    # Lighting edit: same geometry as the expression edit, different shading under the relit target.
    light = build_conditions(src, video_fits["relit"], "lighting")
    same = (light.render.max(2) > 0) == (expr.render.max(2) > 0)
    assert same.mean() > 0.999
    right = light.render[:, 256:].astype(float).sum() - expr.render[:, 256:].astype(float).sum()
    left = light.render[:, :256].astype(float).sum() - expr.render[:, :256].astype(float).sum()
    assert right > left  # brighter towards the light
    every = build_conditions(src, tgt, "all")
    from rigface.face import render_fit

    np.testing.assert_array_equal(every.render, render_fit(src, tgt, tgt))  # target pose+lighting, target crop
    assert not np.array_equal(every.render, expr.render)
    np.testing.assert_array_equal(every.expression, tgt.expression)
    with pytest.raises(ValueError):
        build_conditions(src, tgt, "smile")


def test_paste_back_restores_frame(astro_fit):
    from rigface.face import paste_back

    img = fm.astronaut()
    out = paste_back(img, astro_fit.crop, astro_fit.crop_box)
    x0, y0, x1, y1 = astro_fit.crop_box
    inside = (slice(max(y0, 0), y1), slice(max(x0, 0), x1))
    assert np.abs(out[inside].astype(int) - img[inside].astype(int)).mean() < 6
    edited = np.zeros_like(astro_fit.crop)
    masked = paste_back(img, edited, astro_fit.crop_box, astro_fit.mask)
    changed = np.any(masked != img, axis=2)
    assert changed[:, : max(x0 - 1, 0)].sum() == 0  # nothing outside the box changes
    lm = astro_fit.landmarks[:, :2].mean(0) * (x1 - x0) / 512 + [x0, y0]
    assert masked[int(lm[1]), int(lm[0])].max() < 5  # the face region was pasted
    assert (masked[5, x0 + 5] == img[5, x0 + 5]).all()  # sky in the box, outside the head mask, stays exact


def test_identity_same_face_closer_than_other(astro_fit, analyzer):
    from rigface.face import IdentityEmbedder, identity_distance

    emb = IdentityEmbedder(FaceConfig())
    a = emb.embed(astro_fit.crop)
    assert a.shape == (128,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-4)
    moved = analyzer.analyze(fm.shifted(fm.astronaut(), 30, 20))
    other = analyzer.analyze(fm.grace_hopper())
    assert isinstance(moved, FaceFit) and isinstance(other, FaceFit)
    same = identity_distance(a, emb.embed(moved.crop))
    diff = identity_distance(a, emb.embed(other.crop))
    assert same < 0.8 < diff, (same, diff)


def test_metrics_distances(astro_fit, video_fits):
    from rigface.face import expression_distance, pose_distance

    rot = video_fits["rotated"]
    assert pose_distance(astro_fit, astro_fit) == 0.0
    assert pose_distance(astro_fit, rot) == pytest.approx(np.radians(15) / 3, abs=np.radians(2))
    assert expression_distance(astro_fit, astro_fit) == 0.0
    assert expression_distance(astro_fit, rot) < 0.1  # the same smile


def test_mediapipe_detector_and_unwired_backends(astro_fit):
    from rigface.face import BackendUnavailable, FaceAnalyzer

    mp = FaceAnalyzer(FaceConfig(detector="mediapipe"))
    try:
        fit = mp.analyze(fm.astronaut())
        assert isinstance(fit, FaceFit) and fit.backends["detector"].startswith("mediapipe")
        ax0, ay0, ax1, ay1 = fit.crop_box
        bx0, by0, bx1, by1 = astro_fit.crop_box
        inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
        assert inter / ((ax1 - ax0) * (ay1 - ay0)) > 0.6
    finally:
        mp.close()
    for cfg in (FaceConfig(detector="insightface"), FaceConfig(fit="deca"), FaceConfig(mask="bisenet")):
        with pytest.raises(BackendUnavailable):
            FaceAnalyzer(cfg)
