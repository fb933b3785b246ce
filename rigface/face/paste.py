"""Paste an edited crop back into the full source frame."""

from __future__ import annotations

import numpy as np


def paste_back(
    frame: np.ndarray,
    crop: np.ndarray,
    crop_box: tuple[int, int, int, int],
    mask: np.ndarray | None = None,
    feather: float = 0.02,
) -> np.ndarray:
    """A copy of `frame` (HxWx3 uint8) with `crop` (SxSx3) resized into `crop_box` (source pixels, may reach
    outside the frame: that part is dropped). With `mask` (SxS, 0/255), only the masked region is pasted,
    feathered over `feather` x box side so the seam does not show; pixels far outside the mask stay exact."""
    import cv2

    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.stack([frame] * 3, -1)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be HxWx3 uint8, got {frame.shape} {frame.dtype}")
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"crop must be SxSx3, got {crop.shape}")
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    bw, bh = x1 - x0, y1 - y0
    if bw <= 0 or bh <= 0:
        raise ValueError(f"empty crop box {crop_box}")
    out = frame.copy()
    h, w = frame.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 <= sx0 or sy1 <= sy0:
        return out
    interp = cv2.INTER_AREA if bw < crop.shape[1] else cv2.INTER_CUBIC
    big = cv2.resize(crop, (bw, bh), interpolation=interp)[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    if mask is None:
        out[sy0:sy1, sx0:sx1] = big
        return out
    alpha = cv2.resize((np.asarray(mask) > 0).astype(np.float32), (bw, bh), interpolation=cv2.INTER_LINEAR)
    k = int(feather * bw) | 1
    if k > 1:
        # Grow the mask by the feather width first, so the blend ramps outside the head, not into it.
        alpha = cv2.dilate(alpha, np.ones((k, k), np.uint8))
        alpha = cv2.GaussianBlur(alpha, (2 * k + 1, 2 * k + 1), 0)
    alpha = alpha[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0, None]
    region = out[sy0:sy1, sx0:sx1].astype(np.float32)
    out[sy0:sy1, sx0:sx1] = (alpha * big + (1 - alpha) * region + 0.5).clip(0, 255).astype(np.uint8)
    return out
