"""Distances between two FaceFits, the attribute metrics of the paper's Table 1 (APD, AED, ALD) on the
default backend's quantities. Each is a mean absolute difference, so the numbers stay comparable across
fits and do not depend on the crop's pixel scale."""

from __future__ import annotations

import numpy as np

from rigface.face.types import FaceFit


def pose_distance(a: FaceFit, b: FaceFit) -> float:
    """Mean absolute difference of (yaw, pitch, roll), in radians."""
    d = np.radians(a.pose.angles().astype(np.float64) - b.pose.angles().astype(np.float64))
    d = (d + np.pi) % (2 * np.pi) - np.pi  # wrap
    return float(np.mean(np.abs(d)))


def expression_distance(a: FaceFit, b: FaceFit) -> float:
    """Mean absolute difference of the expression vectors (blendshape scores in [0, 1] by default)."""
    ea, eb = np.asarray(a.expression, np.float64), np.asarray(b.expression, np.float64)
    if ea.shape != eb.shape:
        raise ValueError(f"expression vectors differ in shape: {ea.shape} vs {eb.shape}")
    return float(np.mean(np.abs(ea - eb)))


def lighting_distance(a: FaceFit, b: FaceFit) -> float:
    """Mean absolute difference of the (9, 3) SH lighting coefficients."""
    return float(np.mean(np.abs(np.asarray(a.lighting, np.float64) - np.asarray(b.lighting, np.float64))))
