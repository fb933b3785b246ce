"""insightface model packs (antelopev2, buffalo_l) run with onnxruntime: SCRFD detection, ArcFace embeddings.

A pack is a folder of ONNX files (local or s3:// prefix). Known names are used first (antelopev2:
scrfd_10g_bnkps.onnx + glintr100.onnx; buffalo_l: det_10g.onnx + w600k_r50.onnx); otherwise each model is
classified the way insightface's model zoo does: >= 6 outputs is a detector, one output with a square
input of 112+ px is a recogniser. Pre/post-processing follows insightface's SCRFD and ArcFaceONNX classes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigface.face.backends.weights import WeightFileMissing, WeightFormatError, local_path
from rigface.face.types import Detection

log = logging.getLogger(__name__)

KNOWN_DETECTORS = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", "det_500m.onnx", "scrfd_2.5g_bnkps.onnx")
KNOWN_RECOGNISERS = ("glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")
# ArcFace's five-point template at 112 x 112 (image-left eye, image-right eye, nose, mouth corners).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def _session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ort.get_available_providers())
    except Exception as exc:
        raise WeightFormatError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class PackFiles:
    detector: Path | None
    recogniser: Path | None


def pack_files(ref: str, need_detector: bool = True, need_recogniser: bool = True) -> PackFiles:
    """The detector and recogniser ONNX files of a pack folder (local path or s3:// prefix)."""
    if "://" in ref:
        from rigface.data import storage

        urls = storage.list_urls(ref.rstrip("/") + "/", ".onnx")
        paths = [local_path(u) for u in urls]
    else:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise WeightFileMissing(f"insightface model pack: folder not found: {folder}")
        paths = sorted(folder.glob("*.onnx"))
    if not paths:
        raise WeightFileMissing(f"insightface model pack {ref}: no .onnx files in it")
    by_name = {p.name: p for p in paths}
    det = next((by_name[n] for n in KNOWN_DETECTORS if n in by_name), None)
    rec = next((by_name[n] for n in KNOWN_RECOGNISERS if n in by_name), None)
    if (need_detector and det is None) or (need_recogniser and rec is None):
        for p in paths:
            kind = classify(p)
            if kind == "detector" and det is None:
                det = p
            elif kind == "recogniser" and rec is None:
                rec = p
    if need_detector and det is None:
        raise WeightFileMissing(f"insightface model pack {ref}: no detection model (e.g. {KNOWN_DETECTORS[0]})")
    if need_recogniser and rec is None:
        raise WeightFileMissing(f"insightface model pack {ref}: no recognition model (e.g. {KNOWN_RECOGNISERS[0]})")
    return PackFiles(det, rec)


def classify(path: Path) -> str:
    sess = _session(path, ["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    outs = sess.get_outputs()
    if len(outs) >= 6:
        return "detector"
    h, w = shape[2], shape[3]
    if len(outs) == 1 and isinstance(h, int) and h == w and h >= 112 and h % 16 == 0 and h not in (192, 96):
        return "recogniser"
    return "other"


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= thresh]
    return keep


class SCRFDDetector:
    """SCRFD (insightface) face detector: `detect(rgb) -> list[Detection]` with five keypoints."""

    name = "insightface-scrfd"

    def __init__(self, path: str | Path, det_size: int = 640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, device: str = "cpu"):
        self.path = Path(path)
        self.sess = _session(self.path, _providers(device))
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        fixed = inp.shape[2:4]
        self.size = (int(fixed[0]), int(fixed[1])) if all(isinstance(v, int) for v in fixed) else (det_size, det_size)
        outs = self.sess.get_outputs()
        if len(outs) not in (6, 9, 10, 15):
            raise WeightFormatError(f"{self.path}: {len(outs)} outputs is not an SCRFD layout (6, 9, 10 or 15)")
        self.fmc = 3 if len(outs) in (6, 9) else 5
        self.strides = (8, 16, 32) if self.fmc == 3 else (8, 16, 32, 64, 128)
        self.use_kps = len(outs) in (9, 15)
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.output_names = [o.name for o in outs]
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.version = self.path.name
        self._lock = threading.Lock()

    def _blob(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        import cv2

        h, w = rgb.shape[:2]
        mh, mw = self.size
        if h / w > mh / mw:
            nh, nw = mh, int(mh * w / h)
        else:
            nw, nh = mw, int(mw * h / w)
        scale = nh / h
        canvas = np.zeros((mh, mw, 3), np.float32)
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh))
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]  # insightface: BGR in, swapRB -> RGB
        return np.ascontiguousarray(blob, np.float32), scale

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        blob, scale = self._blob(rgb)
        with self._lock:
            outs = self.sess.run(self.output_names, {self.input_name: blob})
        boxes, scores, kpss = self.decode(outs)
        if not len(boxes):
            return []
        boxes, kpss = boxes / scale, (kpss / scale if kpss is not None else None)
        keep = _nms(boxes, scores, self.nms_threshold)
        return [
            Detection(tuple(float(v) for v in boxes[i]), float(scores[i]), None if kpss is None else kpss[i].copy())
            for i in keep
        ]

    def decode(self, outs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Network outputs -> boxes (N, 4), scores (N,), keypoints (N, 5, 2) in the padded input's pixels."""
        batched = outs[0].ndim == 3
        all_boxes, all_scores, all_kps = [], [], []
        for i, stride in enumerate(self.strides):
            scores = (outs[i][0] if batched else outs[i]).reshape(-1)
            dist = (outs[i + self.fmc][0] if batched else outs[i + self.fmc]).reshape(-1, 4) * stride
            gh, gw = self.size[0] // stride, self.size[1] // stride
            centers = (np.stack(np.mgrid[:gh, :gw][::-1], -1).astype(np.float32) * stride).reshape(-1, 2)
            centers = np.repeat(centers, self.num_anchors, 0)
            if len(centers) != len(scores):
                raise WeightFormatError(f"{self.path}: stride {stride} gives {len(scores)} scores, expected {len(centers)}")
            pos = np.flatnonzero(scores >= self.score_threshold)
            c = centers[pos]
            all_boxes.append(np.concatenate([c - dist[pos, :2], c + dist[pos, 2:]], 1))
            all_scores.append(scores[pos])
            if self.use_kps:
                k = (outs[i + 2 * self.fmc][0] if batched else outs[i + 2 * self.fmc]).reshape(-1, 10) * stride
                all_kps.append(c[:, None, :] + k[pos].reshape(-1, 5, 2))
        kps = np.concatenate(all_kps).astype(np.float32) if self.use_kps else None
        return np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_scores).astype(np.float32), kps


def _uses_raw_pixels(sess_path: Path) -> bool:
    """insightface's rule: a Sub or Mul among the first graph nodes means normalisation is in the graph."""
    import onnx

    model = onnx.load(str(sess_path), load_external_data=False)
    return any(n.op_type in ("Sub", "Mul") for n in model.graph.node[:8])


class ArcFaceEmbedder:
    """ArcFace (insightface) on the face aligned to its 112 template: `embed(rgb) -> (512,) L2-normalised`."""

    name = "arcface"

    def __init__(self, path: str | Path, detector: SCRFDDetector | None = None, device: str = "cpu"):
        self.path = Path(path)
        self.sess = _session(self.path, _providers(device))
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        size = inp.shape[2]
        self.size = int(size) if isinstance(size, int) else 112
        self.dim = int(self.sess.get_outputs()[0].shape[-1])
        self.mean, self.std = (0.0, 1.0) if _uses_raw_pixels(self.path) else (127.5, 127.5)
        self.detector = detector
        self.version = self.path.name
        self._lock = threading.Lock()

    def align(self, rgb: np.ndarray, five_points: np.ndarray) -> np.ndarray:
        import cv2
        from skimage.transform import SimilarityTransform

        tform = SimilarityTransform.from_estimate(np.asarray(five_points, np.float64), ARCFACE_TEMPLATE * self.size / 112.0)
        if not tform:
            raise ValueError("degenerate five points: no similarity to the ArcFace template")
        return cv2.warpAffine(rgb, tform.params[:2].astype(np.float32), (self.size, self.size), borderValue=0.0)

    def embed_aligned(self, aligned_rgb: np.ndarray) -> np.ndarray:
        x = ((aligned_rgb.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
        with self._lock:
            feat = self.sess.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        feat = np.asarray(feat, np.float32).reshape(-1)
        return feat / max(float(np.linalg.norm(feat)), 1e-12)

    def embed(self, crop_rgb: np.ndarray) -> np.ndarray:
        """Aligned by the detector's keypoints when a face is found; else the centre square resized."""
        import cv2

        rgb = np.ascontiguousarray(crop_rgb[..., :3])
        dets = self.detector.detect(rgb) if self.detector is not None else []
        dets = [d for d in dets if d.keypoints is not None]
        if dets:
            aligned = self.align(rgb, max(dets, key=lambda d: d.area).keypoints)
        else:
            h, w = rgb.shape[:2]
            s = min(h, w)
            c = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            aligned = cv2.resize(c, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return self.embed_aligned(aligned)


# -- the authors' crop (policy "paper") ---------------------------------------------------------------------
# Their preprocess maps the square of half-side 0.75 x box width around the SCRFD box centre onto
# [80, 432] of a 512 crop (a similarity from the 4 corners; no rotation for an axis-aligned square): the crop
# side is 1.5 w x 512 / 352 = 2.18 x the box width. The box height plays no part; cv2 bilinear, black outside.
PAPER_HALF_SIDE = 0.75  # x box width, the square's half side that lands on the template box
PAPER_TEMPLATE_BOX = (80.0, 432.0)  # where that square lands in the 512 crop
PAPER_CROP_SCALE = 2 * PAPER_HALF_SIDE * 512.0 / (PAPER_TEMPLATE_BOX[1] - PAPER_TEMPLATE_BOX[0])  # 2.1818...


def paper_crop_matrix(box: tuple[float, float, float, float], size: int = 512) -> np.ndarray:
    """2x3 affine from frame pixels to the size x size crop, as the authors' preprocess (cv2 pixel convention)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w = x1 - x0
    if not np.isfinite(w) or w <= 0:
        raise ValueError(f"face box {box} has no width")
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    lo, hi = (v * size / 512.0 for v in PAPER_TEMPLATE_BOX)
    k = (hi - lo) / (2 * PAPER_HALF_SIDE * w)
    return np.array([[k, 0.0, lo - k * (cx - PAPER_HALF_SIDE * w)], [0.0, k, lo - k * (cy - PAPER_HALF_SIDE * w)]])


def paper_crop(rgb: np.ndarray, box: tuple[float, float, float, float], size: int = 512
               ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """(crop, 2x3 frame->crop affine, the crop's square in frame pixels rounded to ints) for a detector box."""
    import cv2

    m = paper_crop_matrix(box, size)
    crop = cv2.warpAffine(np.ascontiguousarray(rgb), m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    k, tx, ty = m[0, 0], m[0, 2], m[1, 2]
    x0, y0 = -tx / k, -ty / k
    side = size / k
    square = (int(round(x0)), int(round(y0)), int(round(x0 + side)), int(round(y0 + side)))
    return crop, m, square
