"""Average pose / expression / lighting distances (APD / AED / ALD) between the 3D fits of two faces.

The fits come from the configured face backend (rigface.face.FaceAnalyzer -> FaceFit). Definitions, all plain
Euclidean (L2) distances per image pair, averaged over the set by the report:
- pose: (yaw, pitch, roll) in radians (DECA's pose parameters are radians too);
- expression: the expression vectors (52 blendshape scores in [0, 1] by default, 64 BFM coefficients with deep3d);
- lighting: the flattened (9, 3) second-order SH coefficients.
Values from the default MediaPipe backend are not on the same scale as the paper's DECA/Deep3DFaceRecon numbers.
"""

from __future__ import annotations

import numpy as np


class FitMismatchError(ValueError):
    """Two fits whose attributes cannot be compared (different expression bases or lighting shapes)."""


def _l2(a, b, what: str) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise FitMismatchError(f"{what}: cannot compare shapes {a.shape} and {b.shape}")
    return float(np.linalg.norm(a - b))


def pose_distance(fit_a, fit_b) -> float:
    return _l2(np.deg2rad(fit_a.pose.angles()), np.deg2rad(fit_b.pose.angles()), "pose")


def expression_distance(fit_a, fit_b) -> float:
    return _l2(fit_a.expression, fit_b.expression, "expression")


def lighting_distance(fit_a, fit_b) -> float:
    return _l2(fit_a.lighting, fit_b.lighting, "lighting")


def attribute_distances(edited_fit, target_fit) -> dict[str, float]:
    """{'apd', 'aed', 'ald'} of one edited image against its driver/target."""
    return {
        "apd": pose_distance(edited_fit, target_fit),
        "aed": expression_distance(edited_fit, target_fit),
        "ald": lighting_distance(edited_fit, target_fit),
    }
