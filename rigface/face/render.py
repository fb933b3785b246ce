"""Lambertian SH rendering of the face mesh, pixel-aligned with the crop.

Our own small rasterizer (the maintained ones, nvdiffrast and pytorch3d, need CUDA or have no CPU wheel
here; pyrender/moderngl need an OpenGL context): OpenCV fills a triangle-id buffer far-to-near, numpy
solves barycentrics and shades every covered pixel with interpolated normals and albedo under SH lighting
(Phong-interpolated Lambertian). See bench/face.py for its speed.
"""

from __future__ import annotations

import numpy as np

from rigface.face import geometry


def rasterize(vertices_image: np.ndarray, triangles: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visible triangle per pixel. Returns (pixel flat indices, triangle ids, barycentrics (P, 3)).

    vertices_image: (N, 3) x, y in pixels (pixel centres at +0.5), z = depth (smaller = nearer).
    Back-facing triangles (counter-clockwise on screen, y down) are culled; the front-facing ones are
    drawn far-to-near into a triangle-id buffer with OpenCV's sub-pixel polygon fill (painter's algorithm:
    exact for a culled face mesh, whose only overlaps are whole triangles behind the nose or cheeks), then
    barycentrics are solved per covered pixel, vectorized.
    """
    import cv2

    v = np.asarray(vertices_image, dtype=np.float64)
    tri = v[triangles]  # (F, 3, 3)
    x, y = tri[..., 0], tri[..., 1]
    # Signed area on screen; a triangle facing the camera (CCW in the y-up view frame) is negative here.
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    front = np.flatnonzero(area < -1e-9)
    order = front[np.argsort(-tri[front, :, 2].mean(1), kind="stable")]  # far (large z) first
    ids = np.full((size, size), -1, dtype=np.int32)
    shift = 4  # fixed-point sub-pixel precision; OpenCV samples at integer coords = our pixel centres - 0.5
    pts = np.round((tri[order, :, :2] - 0.5) * (1 << shift)).astype(np.int32)
    for t, p in zip(order.tolist(), pts):
        cv2.fillConvexPoly(ids, p, t, lineType=cv2.LINE_8, shift=shift)
    pix = np.flatnonzero(ids.ravel() >= 0)
    tid = ids.ravel()[pix].astype(np.int64)
    cx, cy = pix % size + 0.5, pix // size + 0.5
    tx, ty = x[tid], y[tid]
    b0 = ((tx[:, 1] - cx) * (ty[:, 2] - cy) - (tx[:, 2] - cx) * (ty[:, 1] - cy)) / area[tid]
    b1 = ((tx[:, 2] - cx) * (ty[:, 0] - cy) - (tx[:, 0] - cx) * (ty[:, 2] - cy)) / area[tid]
    bary = np.clip(np.stack([b0, b1, 1.0 - b0 - b1], 1), 0.0, 1.0)  # edge pixels sit a hair outside
    bary /= np.maximum(bary.sum(1, keepdims=True), 1e-9)
    return pix, tid, bary


def render_lambertian(
    mesh_image: np.ndarray,
    triangles: np.ndarray,
    albedo: np.ndarray,
    lighting: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 render (black outside the face) and its (size, size) bool coverage."""
    normals = geometry.vertex_normals(geometry.image_to_view(mesh_image), triangles)
    pix, tid, bary = rasterize(mesh_image, triangles, size)
    corners = triangles[tid]  # (P, 3)
    n = np.einsum("pk,pkc->pc", bary.astype(np.float32), normals[corners])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    alb = np.einsum("pk,pkc->pc", bary.astype(np.float32), np.asarray(albedo, dtype=np.float32)[corners])
    color = np.clip(alb * geometry.shade(n, lighting), 0.0, 1.0)
    image = np.zeros((size * size, 3), dtype=np.uint8)
    image[pix] = (color * 255.0 + 0.5).astype(np.uint8)
    cover = np.zeros(size * size, dtype=bool)
    cover[pix] = True
    return image.reshape(size, size, 3), cover.reshape(size, size)
