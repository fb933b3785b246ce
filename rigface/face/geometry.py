"""3D face fit from landmarks: similarity pose, Euler angles, normals, SH lighting and albedo. numpy only.

Frames:
- image/crop: x right, y down, z = MediaPipe depth (smaller = nearer), all in crop pixels.
- view: x right, y up, z towards the camera (right-handed), crop pixels: view = (x, -y, -z).
- head/canonical: MediaPipe's canonical face model (cm; x right, y up, z out of the face).
The pose is a weak-perspective similarity view = s * R @ head + t, fitted by least squares (Umeyama).
"""

from __future__ import annotations

import numpy as np

from rigface.face.types import MESH_VERTICES

_FLIP = np.array([1.0, -1.0, -1.0], dtype=np.float32)


def image_to_view(points: np.ndarray) -> np.ndarray:
    return (np.asarray(points, dtype=np.float32) * _FLIP).astype(np.float32)


view_to_image = image_to_view  # the flip is its own inverse


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """s, R, t minimising |s R src + t - dst|^2 (Umeyama 1991), R a proper rotation."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[2] = -1.0
    rot = u @ np.diag(d) @ vt
    var = (a**2).sum() / len(src)
    scale = float((sig * d).sum() / var)
    t = mu_d - scale * rot @ mu_s
    return scale, rot, t


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Ry(yaw) Rx(pitch) Rz(-roll), angles in degrees (conventions documented on types.Pose)."""
    y, p, r = np.radians([yaw, pitch, roll])
    return _ry(y) @ _rx(p) @ _rz(-r)


def euler_from_rotation(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of rotation_from_euler: (yaw, pitch, roll) in degrees."""
    rot = np.asarray(rot, dtype=np.float64)
    f = rot[:, 2]  # where the face points, in the view frame
    yaw = np.arctan2(f[0], f[2])
    pitch = np.arcsin(np.clip(-f[1], -1.0, 1.0))
    m = (_ry(yaw) @ _rx(pitch)).T @ rot  # = Rz(-roll)
    roll = -np.arctan2(m[1, 0], m[0, 0])
    return tuple(float(v) for v in np.degrees([yaw, pitch, roll]))


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals for a mesh in a right-handed frame (CCW triangles face outwards)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[triangles]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, triangles[:, k], fn)
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    return (vn / np.maximum(norm, 1e-12)).astype(np.float32)


def sh_basis(normals: np.ndarray) -> np.ndarray:
    """(N, 9) second-order real SH basis of unit normals (view frame)."""
    n = np.asarray(normals)
    n = n if n.dtype == np.float32 else n.astype(np.float64)
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    return np.stack(
        [
            np.full_like(x, 0.2820948),
            0.4886025 * y,
            0.4886025 * z,
            0.4886025 * x,
            1.0925484 * x * y,
            1.0925484 * y * z,
            0.3153916 * (3.0 * z * z - 1.0),
            1.0925484 * x * z,
            0.5462742 * (x * x - y * y),
        ],
        axis=1,
    )


def shade(normals: np.ndarray, lighting: np.ndarray) -> np.ndarray:
    """(N, 3) irradiance for unit normals under (9, 3) SH lighting."""
    return sh_basis(np.asarray(normals, dtype=np.float32)) @ np.asarray(lighting, dtype=np.float32)


# The albedo is defined relative to this level: rendering a fit with its own lighting reproduces its pixels.
ALBEDO_LEVEL = 0.5


def sample_colors(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear (N, 3) colours in [0, 1] at image points (x, y)."""
    img = np.asarray(image, dtype=np.float32) / 255.0
    h, w = img.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1.001)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return (
        img[y0, x0] * (1 - fx) * (1 - fy)
        + img[y0, x0 + 1] * fx * (1 - fy)
        + img[y0 + 1, x0] * (1 - fx) * fy
        + img[y0 + 1, x0 + 1] * fx * fy
    )


def _skin_chroma(colors: np.ndarray) -> np.ndarray:
    """Plausible skin under roughly white light: not clipped or black, red >= green >= blue-ish chroma.

    A generic prior (rg-chromaticity box around the skin locus), used only to reject occluders of other
    colours (microphones, sleeves, glasses frames, blocks); it is dropped when it would reject most of a face.
    """
    s = colors.sum(1)
    r = colors[:, 0] / np.maximum(s, 1e-6)
    g = colors[:, 1] / np.maximum(s, 1e-6)
    return (s > 0.15) & (colors.max(1) < 0.985) & (r >= 0.34) & (r <= 0.62) & (g >= 0.26) & (g <= 0.37)


# Ridge per SH band, per vertex: the first band (directional light) is nearly free, the second (its shape)
# is held towards zero, so that light seen on part of the face extrapolates smoothly to the rest.
_BAND_RIDGE = np.array([1e-5] + [1e-3] * 3 + [1e-2] * 5)


_IRLS_STEPS = 10
_TUKEY_C = 3.0


def _solve_lighting(basis: np.ndarray, colors: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    a = basis[idx] * ALBEDO_LEVEL
    aw = a * w[:, None]
    return np.linalg.solve(aw.T @ a + w.sum() * np.diag(_BAND_RIDGE), aw.T @ colors[idx])


def fit_lighting(
    image: np.ndarray, mesh_image: np.ndarray, normals_view: np.ndarray, min_facing: float = 0.3,
    keep: float = 0.6,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Robust SH lighting (9, 3) and a template skin albedo (468, 3) from the pixels under the mesh.

    Lambertian model colour = albedo * (SH(n) . L). Albedo and lighting share a scale, so the lighting is
    fitted with a uniform albedo ALBEDO_LEVEL on skin vertices only (no eyes, brows, lips), and the albedo is
    a model, not the pixels: one robust skin colour, the lips tinted by a template (head.template_albedo).
    So whatever covers the face (a hand, a microphone, hair strands, glasses) cannot be painted into the
    render; it can only pull the lighting and the skin colour, which the fit guards against with a skin
    chroma prior and a multi-start least-trimmed-squares fit (starts on the whole face and on each half,
    each concentrated onto its best `keep` share of vertices; the lowest trimmed cost wins), so an occluder
    over up to about half of the face is an outlier. Returns (lighting, albedo, rmse on the inliers).
    """
    from rigface.face import head

    skin, _ = head.face_regions()
    facing = normals_view[:MESH_VERTICES, 2] > min_facing
    cand = np.flatnonzero(facing & skin)
    if len(cand) < 30:
        raise ValueError(f"only {len(cand)} skin vertices of the mesh face the camera")
    colors = sample_colors(image, mesh_image[:MESH_VERTICES, :2]).astype(np.float64)
    basis = sh_basis(normals_view[:MESH_VERTICES]).astype(np.float64)
    plausible = cand[_skin_chroma(colors[cand])]
    if len(plausible) >= max(30, len(cand) // 4):  # a gray, tinted or oddly lit frame keeps every vertex
        cand = plausible
    # Start from a constant light that reproduces the median skin colour (the majority of the face), then
    # iteratively reweighted least squares with Tukey's biweight: vertices far off the fitted light get no say.
    lighting = np.zeros((9, 3))
    lighting[0] = np.median(colors[cand], axis=0) / (ALBEDO_LEVEL * 0.2820948)
    w = np.ones(len(cand))
    for _ in range(_IRLS_STEPS):
        resid = np.abs(basis[cand] * ALBEDO_LEVEL @ lighting - colors[cand]).sum(1)
        scale = max(1.4826 * float(np.median(resid)), 0.02)
        u = resid / (_TUKEY_C * scale)
        w = np.where(u < 1.0, (1.0 - u**2) ** 2, 0.0)
        lighting = _solve_lighting(basis, colors, cand, w)
    inliers = cand[w > 0.5] if (w > 0.5).sum() >= 20 else cand[np.argsort(-w)[:20]]
    pred = basis[inliers] * ALBEDO_LEVEL @ lighting
    rmse = float(np.sqrt(np.mean((pred - colors[inliers]) ** 2)))
    ratio = colors[inliers] / np.maximum(basis[inliers] @ lighting, 1e-3)
    skin_albedo = np.clip(np.median(ratio, axis=0), 0.0, 1.0)
    return lighting.astype(np.float32), head.template_albedo(skin_albedo), rmse


def fit_pose(mesh_image: np.ndarray, canonical: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Similarity pose of the canonical model onto the image mesh; also the fit's shape in head coordinates.

    Returns (scale, R, t, shape) with view = scale * R @ head + t and shape = the image mesh with the pose
    removed (canonical cm units, so it carries this face's proportions and expression).
    """
    view = image_to_view(mesh_image[:MESH_VERTICES])
    s, rot, t = similarity_fit(canonical, view)
    shape = ((view - t) @ rot) / s
    return s, rot, t, shape.astype(np.float32)


def pose_mesh(shape: np.ndarray, scale: float, rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Head-coordinate shape -> (468, 3) image-frame mesh in crop pixels."""
    view = scale * np.asarray(shape, dtype=np.float64) @ np.asarray(rot).T + np.asarray(t)
    return view_to_image(view.astype(np.float32))


def similarity_matrix(scale: float, rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    m = np.eye(4, dtype=np.float32)
    m[:3, :3] = scale * np.asarray(rot)
    m[:3, 3] = t
    return m


def decompose_matrix(m: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    m = np.asarray(m, dtype=np.float64)
    scale = float(np.cbrt(np.linalg.det(m[:3, :3])))
    return scale, m[:3, :3] / scale, m[:3, 3].copy()
