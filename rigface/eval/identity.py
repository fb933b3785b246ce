"""Identity distance: L2 between unit-normalised face embeddings (SFace by default, ArcFace with user weights).

The embedder is anything with ``embed(crop: HxWx3 uint8 RGB) -> 1-D array`` (rigface.face.IdentityEmbedder is
one); tests and callers that already hold embeddings use ``identity_distance`` directly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Embedder(Protocol):
    def embed(self, crop: np.ndarray) -> np.ndarray: ...


class EmbeddingError(ValueError):
    """Embeddings that cannot be compared (shape mismatch, zero or non-finite vectors)."""


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise EmbeddingError("embedding is zero or not finite")
    return v / norm


def identity_distance(a, b) -> float:
    """||a/|a| - b/|b|||, in [0, 2]; 0 is the same direction (paper Table 1: 0.356 with ArcFace)."""
    ua, ub = unit(a), unit(b)
    if ua.shape != ub.shape:
        raise EmbeddingError(f"embeddings of different sizes: {ua.shape} vs {ub.shape}")
    return float(np.linalg.norm(ua - ub))
