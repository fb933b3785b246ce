"""Lambertian SH rendering of a mesh, pixel-aligned with the crop.

A small z-buffered scanline rasterizer compiled with numba (written by hand: the maintained ones, nvdiffrast
and pytorch3d, need CUDA or have no CPU wheel here; pyrender/moderngl need an OpenGL context). One pass per
triangle: back faces culled, pixel centres inside the triangle (with a half-pixel rim, as OpenCV's polygon
fill draws, so coverage matches the earlier OpenCV+numpy renderer) get interpolated depth, normal and albedo,
shaded per pixel under second-order SH lighting (Phong-interpolated Lambertian). ~1-3 ms at 512 px on one
core after the first call compiles (cached on disk). See bench/face.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rigface.face import geometry

# Pixels whose centre lies within this distance (px) outside a triangle edge still count as covered: OpenCV's
# fillConvexPoly, which the first renderer used, draws the edges themselves, about half a pixel out.
EDGE_RIM = 0.5


@njit(cache=True, nogil=True, fastmath=True)
def _raster(v, tris, size, rim):  # pragma: no cover - compiled
    """Triangle id (-1 = none) and barycentrics per pixel, nearest front-facing triangle wins."""
    ids = np.full((size, size), -1, np.int32)
    depth = np.full((size, size), 3e38, np.float32)  # finite: fastmath assumes no inf
    bary = np.empty((size, size, 3), np.float32)  # read only where ids >= 0
    for f in range(tris.shape[0]):
        i0, i1, i2 = tris[f, 0], tris[f, 1], tris[f, 2]
        x0, y0, z0 = v[i0, 0], v[i0, 1], v[i0, 2]
        x1, y1, z1 = v[i1, 0], v[i1, 1], v[i1, 2]
        x2, y2, z2 = v[i2, 0], v[i2, 1], v[i2, 2]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if area > -1e-9:  # back-facing or degenerate (front = negative with y down)
            continue
        # Edge lengths turn the edge functions into distances, for the rim test.
        l0 = np.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        l1 = np.sqrt((x0 - x2) ** 2 + (y0 - y2) ** 2)
        l2 = np.sqrt((x1 - x0) ** 2 + (y1 - y0) ** 2)
        xmin = max(int(np.floor(min(x0, x1, x2) - rim)), 0)
        xmax = min(int(np.ceil(max(x0, x1, x2) + rim)), size - 1)
        ymin = max(int(np.floor(min(y0, y1, y2) - rim)), 0)
        ymax = min(int(np.ceil(max(y0, y1, y2) + rim)), size - 1)
        inv = 1.0 / area
        for py in range(ymin, ymax + 1):
            cy = py + 0.5
            for px in range(xmin, xmax + 1):
                cx = px + 0.5
                e0 = (x1 - cx) * (y2 - cy) - (x2 - cx) * (y1 - cy)
                e1 = (x2 - cx) * (y0 - cy) - (x0 - cx) * (y2 - cy)
                e2 = (x0 - cx) * (y1 - cy) - (x1 - cx) * (y0 - cy)
                # inside: all e <= 0 (area < 0); e / length = signed distance to that edge
                if e0 > rim * l0 or e1 > rim * l1 or e2 > rim * l2:
                    continue
                b0 = min(max(e0 * inv, 0.0), 1.0)
                b1 = min(max(e1 * inv, 0.0), 1.0)
                b2 = min(max(e2 * inv, 0.0), 1.0)
                s = b0 + b1 + b2
                if s <= 1e-12:
                    continue
                b0, b1, b2 = b0 / s, b1 / s, b2 / s
                z = b0 * z0 + b1 * z1 + b2 * z2
                if z < depth[py, px]:
                    depth[py, px] = z
                    ids[py, px] = f
                    bary[py, px, 0] = b0
                    bary[py, px, 1] = b1
                    bary[py, px, 2] = b2
    return ids, bary


@njit(cache=True, nogil=True, fastmath=True)
def _shade(ids, bary, tris, normals, albedo, light):  # pragma: no cover - compiled
    size = ids.shape[0]
    image = np.zeros((size, size, 3), np.uint8)
    for py in range(size):
        for px in range(size):
            f = ids[py, px]
            if f < 0:
                continue
            nx = ny = nz = 0.0
            ar = ag = ab = 0.0
            for k in range(3):
                b = bary[py, px, k]
                i = tris[f, k]
                nx += b * normals[i, 0]
                ny += b * normals[i, 1]
                nz += b * normals[i, 2]
                ar += b * albedo[i, 0]
                ag += b * albedo[i, 1]
                ab += b * albedo[i, 2]
            n = np.sqrt(nx * nx + ny * ny + nz * nz)
            if n < 1e-9:
                n = 1e-9
            x, y, z = nx / n, ny / n, nz / n
            b1, b2, b3 = 0.4886025 * y, 0.4886025 * z, 0.4886025 * x
            b4, b5, b6 = 1.0925484 * x * y, 1.0925484 * y * z, 0.3153916 * (3.0 * z * z - 1.0)
            b7, b8 = 1.0925484 * x * z, 0.5462742 * (x * x - y * y)
            for c in range(3):
                irr = (0.2820948 * light[0, c] + b1 * light[1, c] + b2 * light[2, c] + b3 * light[3, c]
                       + b4 * light[4, c] + b5 * light[5, c] + b6 * light[6, c] + b7 * light[7, c]
                       + b8 * light[8, c])
                a = ar if c == 0 else (ag if c == 1 else ab)
                val = min(max(a * irr, 0.0), 1.0)
                image[py, px, c] = np.uint8(val * 255.0 + 0.5)
    return image


def rasterize(vertices_image: np.ndarray, triangles: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visible triangle per pixel. Returns (pixel flat indices, triangle ids, barycentrics (P, 3)).

    vertices_image: (N, 3) x, y in pixels (pixel centres at +0.5), z = depth (smaller = nearer).
    Back-facing triangles (counter-clockwise on screen, y down) are culled; a z-buffer keeps the nearest.
    """
    ids, bary = _raster(np.ascontiguousarray(vertices_image, dtype=np.float64),
                        np.ascontiguousarray(triangles, dtype=np.int64), int(size), EDGE_RIM)
    pix = np.flatnonzero(ids.ravel() >= 0)
    return pix, ids.ravel()[pix].astype(np.int64), bary.reshape(-1, 3)[pix]


def render_lambertian(
    mesh_image: np.ndarray,
    triangles: np.ndarray,
    albedo: np.ndarray,
    lighting: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 render (black outside the mesh) and its (size, size) bool coverage."""
    tris = np.ascontiguousarray(triangles, dtype=np.int64)
    normals = geometry.vertex_normals(geometry.image_to_view(mesh_image), tris)
    ids, bary = _raster(np.ascontiguousarray(mesh_image, dtype=np.float64), tris, int(size), EDGE_RIM)
    image = _shade(ids, bary, tris, np.ascontiguousarray(normals, dtype=np.float64),
                   np.ascontiguousarray(albedo, dtype=np.float64),
                   np.ascontiguousarray(lighting, dtype=np.float64))
    return image, ids >= 0
