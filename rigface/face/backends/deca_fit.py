"""DECA codes in the project's terms: the DECA crop inside the 512 crop, FaceFit geometry, SH lighting, renders.

Frames. DECA's FLAME world frame has x right, y up, z towards the camera: the axes of the project's view frame
(rigface.face.geometry). DECA's orthographic camera maps a world point W to NDC s * (W + (tx, ty, 0)), then
to its 224 crop as (ndc_x + 1) * 112, (1 - ndc_y) * 112 (y flipped). The DECA crop is an axis-aligned
square (x0, y0, side) in 512-crop pixels, so the whole chain from FLAME head coordinates h (the mesh at zero
global pose, relative to the root joint J0) to the 512 crop's view frame is one similarity:

    view = (k s) R_global h + (k s) (J0 + (tx, ty, 0)) + (x0 + k, -(y0 + k), 0),   k = side / 2

which is what FaceFit.transform holds, so poses and re-posing work as for the default backend. (DECA's own
crop maps its box onto pixel centres 0..223; here the box spans the crop's edges, a 0.45% scale difference.)

Lighting. DECA's 9 SH coefficients use its own basis order and constants (renderer.add_SHlight);
`deca_sh_to_project` rewrites them exactly in the basis of geometry.sh_basis, normals in the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rigface.face import geometry
from rigface.face.backends.deca import INPUT_SIZE, Deca
from rigface.face.backends.flame import FLAME, cached_flame, rodrigues
from rigface.face.backends.weights import WeightFileMissing
from rigface.face.types import FaceFit, Pose

DECA_BOX_SCALE = 1.3  # the RigFace authors' DECA crop: FAN box x 1.3 (DECA's default is 1.25)
_KPT68_ENLARGE = 1.1  # DECA's bbox2point for landmark boxes ('kpt68')

# DECA's renderer constants (constant_factor) for its basis [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1].
_PI = np.pi
DECA_SH_CONSTANTS = np.array([
    1 / np.sqrt(4 * _PI),
    (2 * _PI / 3) * np.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * np.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * np.sqrt(3 / (4 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (3 / 2) * np.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (1 / 2) * np.sqrt(5 / (4 * _PI)),
])
# geometry.sh_basis: [c0, c1 y, c1 z, c1 x, c2 xy, c2 yz, c3 (3z^2-1), c2 xz, c4 (x^2-y^2)].
_PROJECT_SH_CONSTANTS = np.array([0.2820948, 0.4886025, 0.4886025, 0.4886025, 1.0925484, 1.0925484, 0.3153916,
                                  1.0925484, 0.5462742])
_DECA_INDEX_OF_PROJECT = np.array([0, 2, 3, 1, 4, 6, 8, 5, 7])  # which DECA term each project term is


def deca_sh_to_project(light: np.ndarray) -> np.ndarray:
    """(9, 3) DECA SH coefficients -> (9, 3) coefficients giving the same shading under geometry.shade."""
    light = np.asarray(light, dtype=np.float64)
    if light.shape[-2:] != (9, 3):
        raise ValueError(f"DECA lighting is (9, 3), got {light.shape}")
    factor = DECA_SH_CONSTANTS[_DECA_INDEX_OF_PROJECT] / _PROJECT_SH_CONSTANTS
    return (light[..., _DECA_INDEX_OF_PROJECT, :] * factor[:, None]).astype(np.float32)


def deca_box(face_box: tuple[float, float, float, float], scale: float = DECA_BOX_SCALE) -> tuple[float, float, float]:
    """DECA's square crop (x0, y0, side) around a tight face box (landmark-like, brows to chin), as FAN's."""
    left, top, right, bottom = (float(v) for v in face_box)
    old = (right - left + bottom - top) / 2 * _KPT68_ENLARGE
    side = old * scale
    return (left + right) / 2 - side / 2, (top + bottom) / 2 - side / 2, side


def extract_deca_crop(image: np.ndarray, box: tuple[float, float, float]) -> np.ndarray:
    """The (x0, y0, side) box of `image` (pixel centres at +0.5) resampled to DECA's 224 x 224 input."""
    import cv2

    x0, y0, side = box
    k = INPUT_SIZE / side
    # u + 0.5 = (x + 0.5 - x0) * k, written for OpenCV's integer pixel centres.
    m = np.array([[k, 0, (0.5 - x0) * k - 0.5], [0, k, (0.5 - y0) * k - 0.5]], dtype=np.float64)
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(np.ascontiguousarray(image), m, (INPUT_SIZE, INPUT_SIZE), flags=interp,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@dataclass
class DecaGeometry:
    """A FLAME mesh placed in the 512 crop: head-coordinate shape, similarity to the view frame, image mesh."""

    shape: np.ndarray  # (V, 3) FLAME units (m), zero global pose, root joint at the origin
    scale: float
    rotation: np.ndarray  # (3, 3) the global pose
    translation: np.ndarray  # (3,) view frame, crop pixels
    mesh: np.ndarray  # (V, 3) crop pixels, image frame (y down, smaller z nearer)


def _tensor(codes: dict[str, np.ndarray], name: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(codes[name], dtype=np.float32))[None]


@torch.no_grad()
def place_mesh(flame: FLAME, codes: dict[str, np.ndarray], box: tuple[float, float, float]) -> DecaGeometry:
    """FLAME(shape, exp, jaw) posed by DECA's global pose and camera, in the crop holding the DECA `box`."""
    shape, exp = _tensor(codes, "shape"), _tensor(codes, "exp")
    local_pose = _tensor(codes, "pose").clone()
    local_pose[:, :3] = 0.0  # the global rotation is rigid about the root joint: applied as the similarity
    root = flame.root_joint(shape, exp)[0].double().numpy()
    head = flame(shape, exp, local_pose)[0].double().numpy() - root
    rot = rodrigues(_tensor(codes, "pose")[:, :3].double())[0].numpy()
    s, tx, ty = (float(v) for v in np.asarray(codes["cam"], dtype=np.float64))
    x0, y0, side = box
    k = side / 2.0
    scale = k * s
    t = scale * (root + np.array([tx, ty, 0.0])) + np.array([x0 + k, -(y0 + k), 0.0])
    mesh = geometry.pose_mesh(head, scale, rot, t)
    return DecaGeometry(head.astype(np.float32), scale, rot, t, mesh)


def fit_albedo(crop: np.ndarray, mesh: np.ndarray, triangles: np.ndarray, lighting: np.ndarray,
               min_facing: float = 0.3) -> np.ndarray:
    """Per-vertex albedo = pixel colour / SH shading on vertices facing the camera inside the crop.

    Without FLAME's UV layout the albedo/texture spaces cannot be sampled, so the albedo comes from the
    pixels, as the default backend's; unseen vertices get the median seen albedo (or ALBEDO_LEVEL).
    """
    size = crop.shape[0]
    normals = geometry.vertex_normals(geometry.image_to_view(mesh), triangles)
    inside = (mesh[:, 0] >= 0) & (mesh[:, 0] < size) & (mesh[:, 1] >= 0) & (mesh[:, 1] < size)
    seen = inside & (normals[:, 2] > min_facing)
    albedo = np.full((len(mesh), 3), geometry.ALBEDO_LEVEL, dtype=np.float32)
    if seen.any():
        colors = geometry.sample_colors(crop, mesh[seen, :2])
        shading = geometry.shade(normals[seen], lighting)
        albedo[seen] = np.clip(colors / np.maximum(shading, 1e-3), 0.0, 1.0)
        albedo[~seen] = np.median(albedo[seen], axis=0)
    return albedo


class DecaFitError(ValueError):
    """DECA's codes give no usable face in the crop (non-finite codes, camera scale <= 0)."""


def fit_deca(deca: Deca, crop: np.ndarray, face_box: tuple[float, float, float, float]) -> dict[str, Any]:
    """Everything a FaceFit needs from DECA, for a crop and the tight face box in its pixels.

    Returns pose, transform, lighting (project SH), albedo, mesh, shape, triangles and `deca`: the codes,
    the DECA box and the FLAME file, which re-posed renders (render_deca) need.
    """
    box = deca_box(face_box)
    codes = deca.encode(extract_deca_crop(crop, box))
    if not all(np.isfinite(v).all() for v in codes.values()):
        raise DecaFitError("DECA gave non-finite codes")
    if codes["cam"][0] <= 0:
        raise DecaFitError(f"DECA camera scale {codes['cam'][0]:.4g} <= 0: no face in the DECA crop")
    geo = place_mesh(deca.flame, codes, box)
    triangles = deca.flame.faces.numpy()
    lighting = deca_sh_to_project(codes["light"])
    yaw, pitch, roll = geometry.euler_from_rotation(geo.rotation)
    tx, ty, tz = geometry.view_to_image(geo.translation.astype(np.float32))
    return {
        "pose": Pose(yaw=yaw, pitch=pitch, roll=roll, translation=(float(tx), float(ty), float(tz)), scale=geo.scale),
        "transform": geometry.similarity_matrix(geo.scale, geo.rotation, geo.translation),
        "lighting": lighting,
        "albedo": fit_albedo(crop, geo.mesh, triangles, lighting),
        "mesh": geo.mesh,
        "shape": geo.shape,
        "triangles": triangles,
        "deca": {"codes": codes, "box": tuple(float(v) for v in box), "flame": deca.flame_path},
    }


def render_deca(shape_fit: FaceFit, pose_fit: FaceFit, light_fit: FaceFit, expression_fit: FaceFit,
                size: int) -> np.ndarray:
    """The source's FLAME identity with the codes swapped per edit (as the authors do), in `pose_fit`'s crop.

    shape_fit: FLAME shape + albedo; pose_fit: global pose, camera and DECA box; expression_fit: FLAME
    expression + jaw; light_fit: SH lighting (any backend: the lighting is in the project's convention).
    """
    from rigface.face.render import render_lambertian

    for role, fit in (("source", shape_fit), ("pose", pose_fit), ("expression", expression_fit)):
        if fit.deca is None:
            raise ValueError(f"the {role} fit is not a DECA fit (fit='deca'): fits from different 3D backends "
                             "cannot be re-posed together")
    flame_path = Path(shape_fit.deca["flame"])
    if not flame_path.exists():  # fits shipped to another machine: FLAME must be at the same path there
        raise WeightFileMissing(f"FLAME model of this DECA fit not found on this machine: {flame_path}")
    codes = Deca.repose(shape_fit.deca["codes"], pose_fit.deca["codes"], "pose")
    codes = Deca.repose(codes, expression_fit.deca["codes"], "expression")
    geo = place_mesh(cached_flame(flame_path), codes, pose_fit.deca["box"])
    mesh = geo.mesh * np.float32(size / pose_fit.crop_size)  # crops of another size: rescale the frame
    image, _ = render_lambertian(mesh, shape_fit.triangles, shape_fit.albedo, light_fit.lighting, size)
    return image
