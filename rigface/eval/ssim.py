"""SSIM with an 11x11 Gaussian window (sigma 1.5), the usual setting for face-editing papers.

Matches ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)``: a 'valid' convolution is exactly skimage's
reflect-filtered map with its 5-pixel border cropped, and the channels are averaged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rigface.eval.images import to_float_batch

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_torch(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of two (N, C, H, W) float batches in [0, data_range]; returns (N,)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n, c, h, w = a.shape
    if min(h, w) < WINDOW:
        raise ValueError(f"ssim needs images of at least {WINDOW}x{WINDOW}, got {h}x{w}")
    # float64 keeps the variance terms (differences of squares) exact enough to match skimage to 1e-6.
    a, b = a.double(), b.double()
    win = gaussian_window().to(a.device).expand(c, 1, WINDOW, WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).float()


def ssim(a, b) -> np.ndarray:
    """SSIM of images or batches (uint8 HxWx3 / NxHxWx3, or float in [0, 1]); returns one value per image."""
    ta, tb = to_float_batch(a), to_float_batch(b)
    return ssim_torch(ta, tb).cpu().numpy()
