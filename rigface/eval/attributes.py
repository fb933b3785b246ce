"""Average pose / expression / lighting distances (APD / AED / ALD) between the 3D fits of two faces.

The fits come from the configured face backend (rigface.face.FaceAnalyzer -> FaceFit); the per-pair distances are
the face area's own definitions (rigface.face.metrics: mean absolute differences of yaw/pitch/roll in radians, of
the expression vectors, and of the (9, 3) SH lighting coefficients), so the dataset tools and the report agree.
The report averages them over the pairs. Values from the default MediaPipe backend are not on the same scale as the
paper's DECA / Deep3DFaceRecon numbers.
"""

from __future__ import annotations

from rigface.face.metrics import expression_distance, lighting_distance, pose_distance


class FitMismatchError(ValueError):
    """Two fits whose attributes cannot be compared (different expression bases or lighting shapes)."""


def attribute_distances(edited_fit, target_fit) -> dict[str, float]:
    """{'apd', 'aed', 'ald'} of one edited image against its driver/target."""
    try:
        if tuple(edited_fit.lighting.shape) != tuple(target_fit.lighting.shape):
            raise ValueError(f"lighting shapes differ: {edited_fit.lighting.shape} vs {target_fit.lighting.shape}")
        return {
            "apd": pose_distance(edited_fit, target_fit),
            "aed": expression_distance(edited_fit, target_fit),
            "ald": lighting_distance(edited_fit, target_fit),
        }
    except ValueError as exc:
        raise FitMismatchError(str(exc)) from exc


__all__ = ["FitMismatchError", "attribute_distances", "expression_distance", "lighting_distance", "pose_distance"]
