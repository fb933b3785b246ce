"""Head masks (face, hair, neck and what sits on them) and the paper's background composite.

Default backend `landmarks`: OpenCV GrabCut on a downscaled crop, seeded from the landmarks: the face
oval is sure foreground; a band around it, a hair cap above it and a neck/shoulder column below it are
probable foreground; the top corners are sure background. The BiSeNet backend plugs in as another
`MaskBackend` (every non-background class is foreground, as in the authors' preprocessing).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKGROUND_FILL = 127  # the authors' gray for the removed head region


class MaskBackend(Protocol):
    name: str
    version: str

    def __call__(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...


class LandmarkGrabCutMask:
    """Landmark-seeded GrabCut. Stateless: safe to share between threads."""

    name = "landmarks-grabcut"

    def __init__(self, work_size: int = 160, iterations: int = 3):
        import cv2

        self.work_size = work_size
        self.iterations = iterations
        self.version = f"opencv-{cv2.__version__}"

    def seeds(self, size: int, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GrabCut seed labels at `size` and the face-oval polygon (int32) at that size."""
        import cv2

        pts = np.ascontiguousarray(landmarks[:, :2], dtype=np.float32)
        hull = cv2.convexHull(pts).reshape(-1, 2)
        x0, y0 = hull.min(0)
        x1, y1 = hull.max(0)
        fw, fh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        gc = np.full((size, size), cv2.GC_PR_BGD, dtype=np.uint8)
        # Sure background: the top corners beside and above the head.
        margin_x = 0.95 * fw
        top = int(max(0, y0 - 0.55 * fh))
        gc[:top, :] = cv2.GC_BGD
        band = np.zeros_like(gc, dtype=bool)
        band[: int(cy), : max(0, int(cx - margin_x))] = True
        band[: int(cy), int(cx + margin_x) :] = True
        gc[band] = cv2.GC_BGD
        # Probable foreground: the face grown by 15%, a hair cap, a neck column widening to the shoulders.
        grown = ((hull - [cx, cy]) * 1.15 + [cx, cy]).astype(np.int32)
        cv2.fillConvexPoly(gc, grown, cv2.GC_PR_FGD)
        cv2.ellipse(gc, (int(cx), int(y0 + 0.15 * fh)), (int(0.62 * fw), int(0.42 * fh)), 0, 180, 360, cv2.GC_PR_FGD, -1)
        neck = np.array(
            [[cx - 0.3 * fw, cy], [cx + 0.3 * fw, cy], [cx + 0.8 * fw, size], [cx - 0.8 * fw, size]], dtype=np.int32
        )
        cv2.fillConvexPoly(gc, neck, cv2.GC_PR_FGD)
        # Sure foreground: the face oval shrunk by 15%.
        inner = ((hull - [cx, cy]) * 0.85 + [cx, cy]).astype(np.int32)
        cv2.fillConvexPoly(gc, inner, cv2.GC_FGD)
        return gc, hull.astype(np.int32)

    def __call__(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        import cv2

        size = crop.shape[0]
        g = min(self.work_size, size)
        k = g / size
        small = cv2.resize(crop, (g, g), interpolation=cv2.INTER_AREA)
        gc, hull = self.seeds(g, np.asarray(landmarks, dtype=np.float32) * k)
        seeded = np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD))
        try:
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), gc, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
            fg = np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD))
        except cv2.error:  # degenerate colour statistics (flat images): keep the seeded region
            fg = seeded
        fg = _largest_component_with(fg, hull)
        mask = fg.astype(np.uint8) * 255
        cv2.fillConvexPoly(mask, hull, 255)  # the face is always head
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)
        return np.where(mask >= 128, 255, 0).astype(np.uint8)


def _largest_component_with(fg: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Keep the component that holds the face centre, with its holes filled (eyes, glasses, mouth)."""
    import cv2

    fg = fg.astype(np.uint8)
    n, labels = cv2.connectedComponents(fg, connectivity=8)
    if n > 2:
        cx, cy = np.clip(hull.mean(0).astype(int), 0, np.array(fg.shape[::-1]) - 1)
        lab = labels[cy, cx]
        if lab == 0:
            lab = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        fg = (labels == lab).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(fg)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def make_mask_backend(name: str, cfg=None) -> MaskBackend:
    if name == "landmarks":
        return LandmarkGrabCutMask(**({"work_size": cfg.mask_work_size} if cfg is not None else {}))
    if name == "bisenet" and cfg is not None:  # BiSeNet from the user's 79999_iter.pth
        from rigface.face.backends import make_bisenet

        return make_bisenet(cfg)
    from rigface.face.types import BackendUnavailable

    raise BackendUnavailable(f"mask backend {name!r} needs user-supplied weights (pass the FaceConfig)")


def composite_background(crop: np.ndarray, *masks: np.ndarray) -> np.ndarray:
    """Source pixels outside the union of the head masks, gray 127 inside."""
    head = np.zeros(crop.shape[:2], dtype=bool)
    for m in masks:
        if m.shape != head.shape:
            raise ValueError(f"mask shape {m.shape} does not match crop {head.shape}")
        head |= m > 0
    out = crop.copy()
    out[head] = BACKGROUND_FILL
    return out
