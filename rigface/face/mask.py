"""Head masks (face, hair, neck and what sits on them) and the paper's background composite.

Default backend `landmarks` (LandmarkHeadMask): a head-shape prior drawn from the landmarks (the face oval,
a skull/hair ellipse shifted behind a turned head, a neck column, bands where long hair falls beside the
neck) combined with colour models of head and background learnt from that same crop (a Bayesian colour
posterior, two rounds, as GrabCut does but without its graph cut): ~2-5 ms at 128 px on one core, and on
hand-drawn reference masks of 7 real photos and frames (tests/data/head_masks.json) better IoU and hair
recall than the GrabCut it replaces (kept as `grabcut`: ~100 ms, and it lost hair on turned heads).
No package ships a person/hair segmentation model that installs beside MediaPipe >= 0.10.33 (which ships
no models), so this is written by hand. The BiSeNet backend plugs in as another `MaskBackend` (every
non-background class is foreground, as in the authors' preprocessing).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKGROUND_FILL = 127  # the authors' gray for the removed head region


class MaskBackend(Protocol):
    name: str
    version: str

    def __call__(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...


# Head-shape prior, in units of the face oval's width / height (fw, fh), tuned on the reference masks.
_PRIOR = {"envelope_w": 0.9, "envelope_h": 1.05, "band_w": 0.95, "band_h": 0.9, "skull_cy": 0.2, "skull_w": 0.62,
          "skull_h": 0.62, "neck_w": 0.24, "neck_h": 0.35, "turn_shift": 0.9}
_P_PROBABLE_HEAD, _P_MAYBE_HEAD = 0.85, 0.2  # prior probability of head in the skull/face/neck, and in the envelope


def head_prior(size: int, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prior probability of head per pixel at `size`, face-oval polygon int32): 1 inside the shrunk face
    oval, _P_PROBABLE_HEAD on the skull/hair ellipse, grown face and neck, _P_MAYBE_HEAD in the envelope
    (hair volume, long hair beside the neck), 0 elsewhere (sure background)."""
    import cv2

    p = _PRIOR
    lm = np.asarray(landmarks, np.float32)
    pts = np.ascontiguousarray(lm[:468, :2])
    hull = cv2.convexHull(pts).reshape(-1, 2)
    x0, y0 = hull.min(0)
    x1, y1 = hull.max(0)
    fw, fh = max(float(x1 - x0), 1.0), max(float(y1 - y0), 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # A turned head: the nose tip moves towards the turn and the skull extends the other way.
    turn = float(np.clip((lm[1, 0] - cx) / fw, -0.5, 0.5))
    sx = cx - p["turn_shift"] * turn * fw
    prior = np.zeros((size, size), np.float32)
    cv2.ellipse(prior, (int(sx), int(y0 + 0.35 * fh)), (int(p["envelope_w"] * fw * (1 + abs(turn))),
                int(p["envelope_h"] * fh)), 0, 0, 360, _P_MAYBE_HEAD, -1)
    band = np.array([[sx - p["band_w"] * fw, y0 + 0.3 * fh], [sx + p["band_w"] * fw, y0 + 0.3 * fh],
                     [sx + p["band_w"] * fw, y1 + p["band_h"] * fh], [sx - p["band_w"] * fw, y1 + p["band_h"] * fh]])
    cv2.fillConvexPoly(prior, band.astype(np.int32), _P_MAYBE_HEAD)
    cv2.ellipse(prior, (int(sx), int(y0 + p["skull_cy"] * fh)), (int(p["skull_w"] * fw * (1 + 0.8 * abs(turn))),
                int(p["skull_h"] * fh)), 0, 0, 360, _P_PROBABLE_HEAD, -1)
    cv2.fillConvexPoly(prior, ((hull - [cx, cy]) * 1.1 + [cx, cy]).astype(np.int32), _P_PROBABLE_HEAD)
    chin = float(lm[152, 0])
    neck = np.array([[chin - p["neck_w"] * fw, y1 - 0.2 * fh], [chin + p["neck_w"] * fw, y1 - 0.2 * fh],
                     [chin + p["neck_w"] * fw, y1 + p["neck_h"] * fh], [chin - p["neck_w"] * fw, y1 + p["neck_h"] * fh]])
    cv2.fillConvexPoly(prior, neck.astype(np.int32), _P_PROBABLE_HEAD)
    cv2.fillConvexPoly(prior, ((hull - [cx, cy]) * 0.9 + [cx, cy]).astype(np.int32), 1.0)
    return prior, hull.astype(np.int32)


class LandmarkHeadMask:
    """Head = face, hair, headwear, ears and neck, from a landmark shape prior and colour models learnt per crop.

    Per pixel: posterior = L_head * prior / (L_head * prior + L_bg * (1 - prior)), with L the colour
    histograms (16^3 RGB bins) of the current head and background estimates; smoothed, thresholded at 0.5,
    two rounds (the first learns the background from sure-background pixels only, so hair inside the envelope
    is not taken for background). Then the component holding the face, holes filled. Stateless, thread safe.
    """

    name = "landmarks-colour-prior"

    def __init__(self, work_size: int = 128, rounds: int = 2, bins: int = 16, smooth: float = 1.5):
        import cv2

        self.work_size, self.rounds, self.bins, self.smooth = work_size, rounds, bins, smooth
        self.version = f"v1/opencv-{cv2.__version__}"

    def __call__(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        import cv2

        size = crop.shape[0]
        g = min(self.work_size, size)
        k = g / size
        small = cv2.resize(np.ascontiguousarray(crop), (g, g), interpolation=cv2.INTER_AREA)
        prior, hull = head_prior(g, np.asarray(landmarks, np.float32) * k)
        q = (small // (256 // self.bins)).astype(np.int32)
        colour = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        nbins = self.bins ** 3
        head = prior >= 0.5
        for r in range(self.rounds):
            background = (prior <= 0) if r == 0 else (~head & (prior < 1))
            lh = np.bincount(colour[head], minlength=nbins).astype(np.float32) + 0.5
            lb = np.bincount(colour[background], minlength=nbins).astype(np.float32) + 0.5
            lh, lb = (lh / lh.sum())[colour], (lb / lb.sum())[colour]
            post = cv2.GaussianBlur(lh * prior / (lh * prior + lb * (1 - prior) + 1e-12), (0, 0), self.smooth)
            head = (post > 0.5) | (prior >= 1.0)
        head = _largest_component_with(head, hull)
        mask = head.astype(np.uint8) * 255
        cv2.fillConvexPoly(mask, hull, 255)  # the face is always head
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)
        return np.where(mask >= 128, 255, 0).astype(np.uint8)


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
            # GrabCut's k-means draws from OpenCV's per-thread RNG, whose state carries over from earlier calls:
            # without a fixed seed a mask depends on which frames this process saw before (shards of a rerun
            # or of a restarted worker would differ).
            cv2.setRNGSeed(0)
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
        return LandmarkHeadMask(**({"work_size": cfg.mask_work_size} if cfg is not None else {}))
    if name == "grabcut":  # the earlier default, kept for comparison (bench/face.py)
        return LandmarkGrabCutMask()
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
