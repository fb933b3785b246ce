"""Typed results of face analysis. numpy only: importing this module must not import cv2 or mediapipe.

Conventions (shared with the shard schema in rigface.data):
- Images are uint8 RGB, HxWx3. Masks are uint8 (S, S) with 0 (background) or 255 (head).
- "Crop pixels": coordinates in the S x S crop (S = FaceConfig.crop_size, 512), x right, y down;
  z is depth in the same pixel units (smaller z = nearer the camera), as MediaPipe reports it.
- `crop_box` is in source-frame pixels. It is slid inside the frame and shrunk to the frame first; only
  what still lies outside is padded, with mirrored frame pixels (scores["padded_fraction"] says how much).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

MESH_VERTICES = 468  # canonical MediaPipe face mesh (the 10 iris landmarks are not part of it)
NUM_LANDMARKS = 478
SH_COEFFS = 9  # second-order spherical harmonics


class SkipReason(str, Enum):
    """Why a frame gave no FaceFit. Values are stable strings: they are counted in shard stats."""

    no_face = "no_face"
    several_faces = "several_faces"
    too_small = "too_small"
    low_confidence = "low_confidence"
    bad_image = "bad_image"
    fit_failed = "fit_failed"
    too_much_padding = "too_much_padding"


@dataclass
class FaceSkip:
    reason: SkipReason
    detail: str = ""

    def to_meta(self) -> dict[str, str]:
        return {"reason": self.reason.value, "detail": self.detail}


@dataclass
class Pose:
    """Head pose of the face in the camera frame. Angles in degrees.

    yaw: positive when the head turns to the image's right (the subject's left);
    pitch: positive when the head tilts down (chin towards the chest);
    roll: positive when the head tilts clockwise in the image.
    translation: head-model origin in crop pixels (x right, y down, z depth as MediaPipe: smaller = nearer).
    scale: crop pixels per canonical-model centimetre (weak-perspective scale).
    """

    yaw: float
    pitch: float
    roll: float
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def angles(self) -> np.ndarray:
        return np.array([self.yaw, self.pitch, self.roll], dtype=np.float32)

    def to_meta(self) -> dict[str, Any]:
        return {
            "yaw": float(self.yaw),
            "pitch": float(self.pitch),
            "roll": float(self.roll),
            "translation": [float(t) for t in self.translation],
            "scale": float(self.scale),
        }


@dataclass
class FaceFit:
    """Everything the dataset and the editor need from one frame.

    crop_box: (x0, y0, x1, y1) in source-frame pixels, a square; `crop` is that box resized to S x S.
    crop: (S, S, 3) uint8 RGB.
    landmarks: (478, 3) float32 in crop pixels (MediaPipe FaceLandmarker order, iris last).
    pose: head pose (degrees + translation).
    transform: (4, 4) float32 similarity from the canonical face model (cm; x right, y up, z out of the face)
        to the crop's view frame (pixels; x right, y UP, z towards the camera), i.e. scale * R | t.
    expression: (D,) float32 expression vector (D=52 blendshape scores for the default backend).
    lighting: (9, 3) float32 second-order SH coefficients per RGB channel, on colours in [0, 1]
        (band order: 1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2; normals in crop axes, z towards the camera).
    albedo: (V, 3) float32 per-vertex albedo in [0, 1] (V = 468, or 5023 FLAME vertices for fit="deca").
    mesh: (V, 3) float32 face mesh vertices in crop pixels (the render is drawn from these).
    mask: (S, S) uint8 head mask, 0 or 255 (face, hair, neck and what sits on them).
    scores: detection and fit quality, e.g. {"detection": 0.93, "lighting_rmse": 0.04, ...}.
    backends: name -> version, e.g. {"detector": "yunet-2023mar/opencv-4.x", ...}.
    shape: (V, 3) float32 the same mesh in head coordinates (pose removed, canonical-model cm units; for
        fit="deca" FLAME metres about its root joint); re-posing an edit applies another fit's pose to this.
    frame_size: (height, width) of the source frame.
    mediapipe_transform: (4, 4) MediaPipe's own perspective facial transformation matrix (cm), for reference.
    triangles: (F, 3) int mesh faces of `mesh`/`shape` when not the canonical MediaPipe mesh (FLAME's for DECA).
    deca: for fit="deca": {"codes": DECA's code dict (shape, tex, exp, pose, cam, light), "box": the DECA
        crop (x0, y0, side) in crop pixels, "flame": the FLAME model file}; re-posed renders swap codes.
    """

    crop_box: tuple[int, int, int, int]
    crop: np.ndarray
    landmarks: np.ndarray
    pose: Pose
    transform: np.ndarray
    expression: np.ndarray
    lighting: np.ndarray
    albedo: np.ndarray
    mesh: np.ndarray
    mask: np.ndarray
    scores: dict[str, float] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    shape: np.ndarray | None = None
    frame_size: tuple[int, int] = (0, 0)
    mediapipe_transform: np.ndarray | None = None
    triangles: np.ndarray | None = None
    deca: dict[str, Any] | None = None

    @property
    def crop_size(self) -> int:
        return int(self.crop.shape[0])

    def to_meta(self) -> dict[str, Any]:
        """A JSON-able summary (no big arrays): what goes into a shard's meta.json."""
        meta = {
            "crop_box": [int(v) for v in self.crop_box],
            "crop_size": self.crop_size,
            "frame_size": [int(v) for v in self.frame_size],
            "pose": self.pose.to_meta(),
            "transform": np.asarray(self.transform, dtype=np.float64).round(6).tolist(),
            "lighting": np.asarray(self.lighting, dtype=np.float64).round(6).tolist(),
            "expression_dim": int(np.asarray(self.expression).shape[0]),
            "scores": {k: float(v) for k, v in self.scores.items()},
            "backends": {k: str(v) for k, v in self.backends.items()},
        }
        if self.deca is not None:  # DECA's 236 codes and crop: enough to re-pose and re-render from a shard
            meta["deca"] = {
                "codes": {k: np.asarray(v, np.float64).round(6).tolist() for k, v in self.deca["codes"].items()},
                "box": [round(float(v), 3) for v in self.deca["box"]],
            }
        return meta


@dataclass
class PairConditions:
    """The conditions of one edit, all in the S x S crop frame used for generation.

    render: (S, S, 3) uint8 Lambertian SH rendering of the face (black outside the face).
    background: (S, S, 3) uint8 source crop with the head region filled with gray 127.
    expression: (D,) float32 expression vector.
    mask_source / mask_target: (S, S) uint8 head masks (0 or 255) of the two fits.
    edit: which edit these conditions encode.
    """

    render: np.ndarray
    background: np.ndarray
    expression: np.ndarray
    mask_source: np.ndarray
    mask_target: np.ndarray
    edit: str = "all"


__all__ = [
    "BackendUnavailable",
    "Detection",
    "MESH_VERTICES",
    "NUM_LANDMARKS",
    "SH_COEFFS",
    "FaceFit",
    "FaceSkip",
    "PairConditions",
    "Pose",
    "SkipReason",
]


# Owned here, not in detect.py, so that the backends (which detect.py loads) need not import detect.py.
class BackendUnavailable(RuntimeError):
    """A configured backend needs weights or packages that are not available here."""


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in frame pixels
    score: float
    keypoints: np.ndarray | None = None  # (5, 2): right eye, left eye, nose, right mouth, left mouth (YuNet order)

    @property
    def size(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)
