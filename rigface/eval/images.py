"""Image conventions shared by the metrics: RGB, uint8 in [0, 255] or float in [0, 1], HWC or NHWC arrays."""

from __future__ import annotations

import numpy as np
import torch


class ImageFormatError(ValueError):
    """An image the metrics cannot read: wrong rank, channel count or dtype."""


def to_float_batch(images, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, H, W) float32 in [0, 1] from an HxWx3 / NxHxWx3 array (uint8 or float in [0, 1]) or a list of them."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageFormatError("empty list of images")
        images = np.stack([np.asarray(i) for i in images])
    if isinstance(images, torch.Tensor):
        raise ImageFormatError("pass numpy arrays (HWC / NHWC); tensors go to the *_torch functions")
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ImageFormatError(f"expected HxWx3 or NxHxWx3 RGB, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise ImageFormatError(f"expected uint8 or float images, got {arr.dtype}")
    return t.permute(0, 3, 1, 2).contiguous().to(device)
