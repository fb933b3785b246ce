"""Evaluation metrics (SSIM, LPIPS, FID, identity, pose/expression/lighting distances) and the Table-1 report.

Submodules import torch; this package file stays light so ``from rigface.eval.report import EvalReport`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ssim": "rigface.eval.ssim", "ssim_torch": "rigface.eval.ssim",
    "LPIPS": "rigface.eval.lpips_net", "LPIPSWeightsError": "rigface.eval.lpips_net",
    "InceptionFeatures": "rigface.eval.fid", "FeatureStats": "rigface.eval.fid",
    "frechet_distance": "rigface.eval.fid", "fid_from_stats": "rigface.eval.fid", "FIDError": "rigface.eval.fid",
    "identity_distance": "rigface.eval.identity", "Embedder": "rigface.eval.identity",
    "pose_distance": "rigface.eval.attributes", "expression_distance": "rigface.eval.attributes",
    "lighting_distance": "rigface.eval.attributes", "attribute_distances": "rigface.eval.attributes",
    "EvalReport": "rigface.eval.report", "PAPER_ROW": "rigface.eval.report", "COLUMNS": "rigface.eval.report",
    "PairScorer": "rigface.eval.scorer", "ReportBuilder": "rigface.eval.scorer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rigface.eval' has no attribute {name!r}")
