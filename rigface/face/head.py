"""The head proxy that the landmarker path renders: MediaPipe's 468-vertex face mesh plus a cranium and jaw.

The landmarks stop at the face oval (mid-forehead, jaw line). DECA renders the whole FLAME head; the embedded
backend has no head model, so we grow rings of extra vertices outward from the face oval over an ellipsoid
that approximates an adult cranium in the canonical model's frame (cm; x right, y up, z out of the face).
Each extra vertex is a face-oval vertex plus a fixed offset in head coordinates, so it follows that fit's
face proportions and is posed by the same similarity as the face. It covers forehead to hairline, the top
and sides of the skull to behind the ears, the jaw's underside; it leaves out ears, neck, hair volume,
eyeballs and the mouth interior, which DECA's FLAME head has (all but hair).
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rigface.face.types import MESH_VERTICES

# Adult cranium in canonical cm: width ~16, chin-to-vertex ~23, glabella-to-back ~19 (anthropometric means).
_CENTRE = np.array([0.0, 2.0, -4.0])
_RADII = np.array([8.0, 11.0, 9.5])
_RINGS = 6
_MAX_POLAR_DEG = 118.0  # a little past the side silhouette, so pitched/turned heads keep their outline


@dataclass(frozen=True)
class HeadMesh:
    triangles: np.ndarray  # (F, 3) int32 over the face vertices then the extra ones, CCW = outward
    anchors: np.ndarray  # (E,) face-oval vertex each extra vertex follows
    offsets: np.ndarray  # (E, 3) float32 cm, added to the anchor in head coordinates
    oval: np.ndarray  # the face mesh's outer boundary loop, in order

    @property
    def num_vertices(self) -> int:
        return MESH_VERTICES + len(self.anchors)

    def extend(self, shape: np.ndarray) -> np.ndarray:
        """(468, 3) head-coordinate face shape -> (468 + E, 3) head shape."""
        shape = np.asarray(shape, dtype=np.float32)
        return np.concatenate([shape, shape[self.anchors] + self.offsets], 0)

    def extend_albedo(self, albedo: np.ndarray) -> np.ndarray:
        """Extra vertices take their anchor's (skin) albedo."""
        albedo = np.asarray(albedo, dtype=np.float32)
        return np.concatenate([albedo, albedo[self.anchors]], 0)


def boundary_loop(triangles: np.ndarray) -> np.ndarray:
    """The longest closed loop of edges used by one triangle only: the outer rim of an open mesh."""
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]], 0)
    key = np.sort(edges, 1)
    uniq, count = np.unique(key, axis=0, return_counts=True)
    rim = uniq[count == 1]
    nbrs: dict[int, list[int]] = {}
    for a, b in rim.tolist():
        nbrs.setdefault(a, []).append(b)
        nbrs.setdefault(b, []).append(a)
    seen: set[int] = set()
    loops = []
    for start in nbrs:
        if start in seen:
            continue
        loop, prev, cur = [start], -1, start
        seen.add(start)
        while True:
            nxt = [n for n in nbrs[cur] if n != prev]
            if not nxt or nxt[0] == start:
                break
            prev, cur = cur, nxt[0]
            if cur in seen:
                break
            seen.add(cur)
            loop.append(cur)
        loops.append(loop)
    return np.array(max(loops, key=len), dtype=np.int64)


def _ellipsoid_point(polar: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    d = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], -1)
    return _CENTRE + _RADII * d


@lru_cache(maxsize=1)
def head_mesh() -> HeadMesh:
    from rigface.face import assets

    canon = assets.canonical_mesh()
    verts = canon.vertices.astype(np.float64)
    oval = boundary_loop(canon.triangles)
    q = (verts[oval] - _CENTRE) / _RADII
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    polar0 = np.arccos(np.clip(q[:, 2], -1.0, 1.0))
    azimuth = np.arctan2(q[:, 1], q[:, 0])
    on_ellipsoid0 = _ellipsoid_point(polar0, azimuth)
    top = np.radians(_MAX_POLAR_DEG)
    n = len(oval)
    anchors, offsets, rings = [], [], [oval.copy()]
    positions = {int(i): verts[i] for i in oval}
    for k in range(1, _RINGS + 1):
        polar = polar0 + (np.maximum(top, polar0 + 0.1) - polar0) * k / _RINGS
        off = _ellipsoid_point(polar, azimuth) - on_ellipsoid0
        ids = MESH_VERTICES + len(anchors) + np.arange(n)
        anchors.extend(oval.tolist())
        offsets.append(off)
        for i, v in zip(ids.tolist(), verts[oval] + off):
            positions[i] = v
        rings.append(ids)
    tris = []
    for a, b in zip(rings[:-1], rings[1:]):
        for i in range(n):
            j = (i + 1) % n
            tris.append((a[i], a[j], b[i]))
            tris.append((a[j], b[j], b[i]))
    # Orient every new triangle outwards (away from the cranium centre): CCW seen from outside.
    oriented = []
    for t in tris:
        p = np.array([positions[int(v)] for v in t])
        nrm = np.cross(p[1] - p[0], p[2] - p[0])
        oriented.append(t if nrm @ (p.mean(0) - _CENTRE) > 0 else (t[0], t[2], t[1]))
    triangles = np.concatenate([canon.triangles.astype(np.int32), np.array(oriented, dtype=np.int32)], 0)
    return HeadMesh(
        triangles=triangles,
        anchors=np.array(anchors, dtype=np.int64),
        offsets=np.concatenate(offsets, 0).astype(np.float32),
        oval=oval,
    )


# -- the skin model: which face vertices show skin, and a template albedo ---------------------------------
# MediaPipe face-mesh ids: eye corners, brow points, mouth corners and lip midpoints.
_EYES = ((33, 133), (362, 263))
_BROWS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
_MOUTH = (61, 291, 0, 17)
# Lips relative to the surrounding skin (a template tint, not measured per frame, so a hand over the mouth
# cannot change it): a typical lip/skin ratio in linear RGB.
LIP_TINT = np.array([0.92, 0.70, 0.74], dtype=np.float32)


@lru_cache(maxsize=1)
def face_regions() -> tuple[np.ndarray, np.ndarray]:
    """(skin, lips) boolean masks over the 468 face vertices, from canonical-model distances (cm)."""
    from rigface.face import assets

    v = assets.canonical_mesh().vertices.astype(np.float64)
    not_skin = np.zeros(len(v), bool)
    for a, b in _EYES:  # the eye opening and lids: an ellipse around the corners
        c, half = (v[a] + v[b]) / 2, np.linalg.norm(v[a] - v[b]) / 2
        d = (v[:, :2] - c[:2]) / np.array([half * 1.25, half * 0.75])
        not_skin |= (d**2).sum(1) <= 1.0
    for i in _BROWS:
        not_skin |= np.linalg.norm(v[:, :2] - v[i, :2], axis=1) <= 0.8
    m = v[list(_MOUTH)]
    c = m.mean(0)
    half_w = np.abs(m[0, 0] - m[1, 0]) / 2
    half_h = max(np.abs(m[2, 1] - m[3, 1]) / 2, 0.5)
    d = (v[:, :2] - c[:2]) / np.array([half_w * 1.05, half_h * 1.25])
    lips = (d**2).sum(1) <= 1.0
    return ~(not_skin | lips), lips


def template_albedo(skin: np.ndarray) -> np.ndarray:
    """(468, 3) albedo: one skin colour everywhere, the lips tinted by the template."""
    _, lips = face_regions()
    albedo = np.tile(np.asarray(skin, dtype=np.float32)[None], (MESH_VERTICES, 1))
    albedo[lips] *= LIP_TINT
    return np.clip(albedo, 0.0, 1.0)
