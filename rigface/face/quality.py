"""Quality of a crop and of a training pair: numbers a user can histogram, sort by and filter on.

Per crop (in `FaceFit.scores`): `sharpness` (variance of the Laplacian of the face region, resampled to a
fixed 128 px so that it compares across face sizes), `landmark_confidence` (agreement in [0, 1] of the
landmarker's five points with the detector's independent ones), plus `face_size` and `padded_fraction`
set by the analyzer. Per pair (`pair_quality`, written to meta.json["quality"]): the worse of the two crops
for each of those, the pose / expression / lighting deltas between source and target, and one `score` in
[0, 1] that `train.min_quality` thresholds. numpy + cv2 only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from rigface.data.quality import QUALITY_FIELDS  # the fields of meta.json["quality"], owned by the data schema

_SHARPNESS_SIDE = 128
SHARP_ENOUGH = 100.0  # Laplacian variance (at 128 px) above which a face counts as sharp (video-call footage: 100-600)
BIG_ENOUGH = 128.0    # face box side in source pixels above which resolution no longer limits a 512 crop much

# MediaPipe landmark ids matching the detector's five points (eye centres from the eye corners, nose tip, mouth).
_EYE_A, _EYE_B, _NOSE, _MOUTH = (33, 133), (362, 263), 1, (61, 291)


def sharpness(crop: np.ndarray, landmarks: np.ndarray) -> float:
    import cv2

    xy = np.asarray(landmarks, np.float32)[:, :2]
    x0, y0 = np.floor(xy.min(0)).astype(int)
    x1, y1 = np.ceil(xy.max(0)).astype(int)
    h, w = crop.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return 0.0
    gray = cv2.cvtColor(np.ascontiguousarray(crop[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(gray, (_SHARPNESS_SIDE, _SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_32F).var())


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) sorted like the detector's: two eyes by x, nose, two mouth corners by x."""
    lm = np.asarray(landmarks, np.float32)[:, :2]
    eyes = np.stack([lm[list(_EYE_A)].mean(0), lm[list(_EYE_B)].mean(0)])
    mouth = lm[list(_MOUTH)]
    return np.concatenate([eyes[np.argsort(eyes[:, 0])], lm[[_NOSE]], mouth[np.argsort(mouth[:, 0])]], 0)


def landmark_confidence(landmarks: np.ndarray, keypoints: np.ndarray | None) -> float:
    """1 - (mean distance of the five points / inter-ocular distance), clipped to [0, 1]; 1.0 without keypoints
    would overstate it, so it is NaN then (the pair's minimum ignores NaN)."""
    if keypoints is None:
        return float("nan")
    ours = five_points(landmarks)
    kp = np.asarray(keypoints, np.float32).reshape(5, 2)
    kp = np.concatenate([kp[:2][np.argsort(kp[:2, 0])], kp[2:3], kp[3:][np.argsort(kp[3:, 0])]], 0)
    iod = max(float(np.linalg.norm(ours[0] - ours[1])), 1.0)
    err = float(np.linalg.norm(ours - kp, axis=1).mean()) / iod
    return float(np.clip(1.0 - err, 0.0, 1.0))


def crop_quality(crop: np.ndarray, landmarks: np.ndarray, keypoints: np.ndarray | None) -> dict[str, float]:
    return {"sharpness": round(sharpness(crop, landmarks), 3),
            "landmark_confidence": round(landmark_confidence(landmarks, keypoints), 4)}


def _worst(a: Mapping[str, float], b: Mapping[str, float], key: str, lower_is_worse: bool = True) -> float:
    vals = [float(d[key]) for d in (a, b) if key in d and np.isfinite(float(d[key]))]
    if not vals:
        return float("nan")
    return min(vals) if lower_is_worse else max(vals)


def pair_quality(src_scores: Mapping[str, float], tgt_scores: Mapping[str, float], src_pose: np.ndarray,
                 tgt_pose: np.ndarray, src_expr: np.ndarray, tgt_expr: np.ndarray, src_light: np.ndarray,
                 tgt_light: np.ndarray, max_padded_fraction: float = 0.25) -> dict[str, float]:
    """The pair's quality fields (see QUALITY_FIELDS). `score` = product of four factors in [0, 1]: sharpness
    (/ SHARP_ENOUGH), face size (/ BIG_ENOUGH), landmark confidence, unpadded share (1 - padded / limit)."""
    q = {
        "face_size": _worst(src_scores, tgt_scores, "face_size"),
        "sharpness": _worst(src_scores, tgt_scores, "sharpness"),
        "landmark_confidence": _worst(src_scores, tgt_scores, "landmark_confidence"),
        "padded_fraction": _worst(src_scores, tgt_scores, "padded_fraction", lower_is_worse=False),
        "pose_delta": float(np.linalg.norm(np.asarray(src_pose, np.float64) - np.asarray(tgt_pose, np.float64))),
        "expression_delta": float(np.linalg.norm(np.asarray(src_expr, np.float64) - np.asarray(tgt_expr, np.float64))),
        "lighting_delta": float(np.linalg.norm(np.asarray(src_light, np.float64) - np.asarray(tgt_light, np.float64))),
    }

    def unit(v: float, full: float) -> float:
        return 1.0 if not np.isfinite(v) else float(np.clip(v / full, 0.0, 1.0))

    padded = q["padded_fraction"] if np.isfinite(q["padded_fraction"]) else 0.0
    q["score"] = (unit(q["sharpness"], SHARP_ENOUGH) * unit(q["face_size"], BIG_ENOUGH)
                  * unit(q["landmark_confidence"], 1.0)
                  * float(np.clip(1.0 - padded / max(max_padded_fraction, 1e-6), 0.0, 1.0) if padded > 0 else 1.0))
    return {k: (round(float(q[k]), 4) if np.isfinite(q[k]) else None) for k in QUALITY_FIELDS}


