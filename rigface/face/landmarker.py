"""MediaPipe FaceLandmarker (Tasks API, model buffer from the shipped face_landmarker.task).

Gives 478 landmarks (in crop pixels here), 52 blendshape scores and MediaPipe's 4x4 facial transform.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from rigface.face import assets


@dataclass
class LandmarkResult:
    landmarks: np.ndarray  # (478, 3) float32, crop pixels (z scaled like x)
    blendshapes: np.ndarray  # (52,) float32
    blendshape_names: tuple[str, ...]
    transform: np.ndarray  # (4, 4) float32, MediaPipe's canonical-face-to-camera matrix (cm)


class Landmarker:
    """Wraps one MediaPipe graph. The graph is not re-entrant: calls are serialised with a lock."""

    name = "landmarker"

    def __init__(self, min_confidence: float = 0.5):
        from mediapipe.tasks.python import BaseOptions
        from mediapipe.tasks.python.vision import FaceLandmarker, FaceLandmarkerOptions

        opts = FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=assets.landmarker_task_bytes()),
            num_faces=1,
            min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self._lm = FaceLandmarker.create_from_options(opts)
        self.version = f"face_landmarker-v2/mediapipe-{assets.package_version('mediapipe')}"
        self._lock = threading.Lock()
        _close_at_exit(self)

    def __call__(self, crop: np.ndarray) -> LandmarkResult | None:
        import mediapipe as mp

        h, w = crop.shape[:2]
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(crop))
        with self._lock:
            res = self._lm.detect(image)
        if not res.face_landmarks:
            return None
        pts = np.array([[p.x * w, p.y * h, p.z * w] for p in res.face_landmarks[0]], dtype=np.float32)
        cats = res.face_blendshapes[0] if res.face_blendshapes else []
        shapes = np.array([c.score for c in cats], dtype=np.float32)
        names = tuple(c.category_name for c in cats)
        mats = res.facial_transformation_matrixes
        transform = np.asarray(mats[0], dtype=np.float32).reshape(4, 4) if mats else np.eye(4, dtype=np.float32)
        return LandmarkResult(pts, shapes, names, transform)

    def close(self) -> None:
        lm, self._lm = getattr(self, "_lm", None), None
        if lm is not None:
            try:
                lm.close()
            except Exception:  # closing at interpreter exit can meet a half-torn-down runtime
                pass


def _close_at_exit(obj) -> None:
    """Close MediaPipe graphs before interpreter teardown: their __del__ then fails noisily otherwise.

    MediaPipe dispatches close() through a concurrent.futures executor, which shuts down in threading's
    exit hooks, before `atexit`; so we hook in there (run in reverse order: ours runs first).
    """
    import atexit
    import threading
    import weakref

    ref = weakref.ref(obj)

    def _close() -> None:
        live = ref()
        if live is not None:
            live.close()

    register = getattr(threading, "_register_atexit", None)
    try:
        (register or atexit.register)(_close)
    except RuntimeError:  # already shutting down
        pass
