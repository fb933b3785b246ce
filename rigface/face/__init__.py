"""Offline face analysis: detection and crop, landmarks, 3D fit, SH lighting, render, head masks, identity.

Public API (imported lazily so that `rigface.face.types` / `rigface.face.config` stay light):
    FaceAnalyzer(cfg).analyze(frame) -> FaceFit | FaceSkip
    build_conditions(source, target, edit) -> PairConditions
    IdentityEmbedder(cfg).embed(crop) -> (128,) ; identity_distance(a, b)
    paste_back(frame, crop, crop_box, mask=None)
    pose_distance / expression_distance / lighting_distance(fit_a, fit_b)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FaceAnalyzer": "rigface.face.analyzer",
    "normalize_frame": "rigface.face.analyzer",
    "build_conditions": "rigface.face.conditions",
    "render_fit": "rigface.face.conditions",
    "IdentityEmbedder": "rigface.face.identity",
    "identity_distance": "rigface.face.identity",
    "paste_back": "rigface.face.paste",
    "pose_distance": "rigface.face.metrics",
    "expression_distance": "rigface.face.metrics",
    "lighting_distance": "rigface.face.metrics",
    "BackendUnavailable": "rigface.face.types",
    "FaceModelMissing": "rigface.face.assets",
    "FaceFit": "rigface.face.types",
    "FaceSkip": "rigface.face.types",
    "PairConditions": "rigface.face.types",
    "Pose": "rigface.face.types",
    "SkipReason": "rigface.face.types",
    "FaceConfig": "rigface.face.config",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from rigface.face.analyzer import FaceAnalyzer, normalize_frame
    from rigface.face.assets import FaceModelMissing
    from rigface.face.conditions import build_conditions, render_fit
    from rigface.face.config import FaceConfig
    from rigface.face.types import BackendUnavailable
    from rigface.face.identity import IdentityEmbedder, identity_distance
    from rigface.face.metrics import expression_distance, lighting_distance, pose_distance
    from rigface.face.paste import paste_back
    from rigface.face.types import FaceFit, FaceSkip, PairConditions, Pose, SkipReason


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rigface.face' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
