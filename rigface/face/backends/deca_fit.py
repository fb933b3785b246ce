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

Renders, as the authors draw them (their utils/compute_renders.py + DECA's SRenderY): the full FLAME head,
albedo = FLAME texture PCA (DECA's 50 tex codes) sampled through head_template.obj's UV map (bilinear,
grid_sample's align_corners=False), shading = DECA's SH on the world vertex normals interpolated per pixel
(not renormalised), image = albedo x shading on black. Codes are swapped per edit by DECA_CODE_SOURCES, and
the mesh is re-centred on its eyes and mouth (`align_ffhq`) at the centre the head's own codes give.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rigface.face import geometry
from rigface.face.backends.deca import INPUT_SIZE, Deca
from rigface.face.backends.flame import FLAME, STATIC_LANDMARKS_FROM, cached_asset, cached_flame, rodrigues
from rigface.face.backends.weights import WeightFileMissing
from rigface.face.types import FaceFit, Pose

DECA_BOX_SCALE = 1.3  # the RigFace authors' DECA crop: FAN box x 1.3 (DECA's default is 1.25)
# MediaPipe 478 -> the 68-point (iBUG/FAN) scheme, the correspondence LatentSync uses; the authors run FAN on the
# 512 crop, whose 68-point box (brows to chin, jaw side to side) sets DECA's crop.
LM68_FROM_MP478 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,  # 0-16 jaw
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,  # 17-26 brows
    168, 197, 5, 4, 75, 97, 2, 326, 305,  # 27-35 nose
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # 36-47 eyes
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,  # 48-67 mouth
)


def landmarks68_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the 68 points taken from MediaPipe's landmarks (crop pixels)."""
    xy = np.asarray(landmarks, np.float64)[list(LM68_FROM_MP478), :2]
    return (*(float(v) for v in xy.min(0)), *(float(v) for v in xy.max(0)))
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
def place_mesh(flame: FLAME, codes: dict[str, np.ndarray], box: tuple[float, float, float],
               world_offset: np.ndarray | None = None) -> DecaGeometry:
    """FLAME(shape, exp, jaw) posed by DECA's global pose and camera, in the crop holding the DECA `box`.

    world_offset: added to the FLAME vertices before the camera (align_ffhq's delta).
    """
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
    offset = np.zeros(3) if world_offset is None else np.asarray(world_offset, np.float64)
    t = scale * (root + offset + np.array([tx, ty, 0.0])) + np.array([x0 + k, -(y0 + k), 0.0])
    mesh = geometry.pose_mesh(head, scale, rot, t)
    return DecaGeometry(head.astype(np.float32), scale, rot, t, mesh)


@torch.no_grad()
def ffhq_center(flame: FLAME, codes: dict[str, np.ndarray], landmarks: tuple[np.ndarray, np.ndarray],
                faces: np.ndarray) -> np.ndarray:
    """DECA decode's align_ffhq centre in FLAME world units: eye centre + 0.1 x (mouth centre - eye centre).

    From the posed FLAME mesh's 68 landmarks (eyes 36-47, mouth corners 48 and 54: all static ones).
    """
    verts = flame(_tensor(codes, "shape"), _tensor(codes, "exp"), _tensor(codes, "pose"))[0].double().numpy()
    lmk_faces, bary = landmarks
    static = np.einsum("lk,lkc->lc", bary, verts[faces[lmk_faces]])  # (51, 3): 68-point ids 17..67

    def lm(i: int) -> np.ndarray:
        return static[i - STATIC_LANDMARKS_FROM]

    eye_left = np.mean([lm(i) for i in range(36, 42)], 0)
    eye_right = np.mean([lm(i) for i in range(42, 48)], 0)
    eye = (eye_left + eye_right) * 0.5
    mouth = (lm(48) + lm(54)) * 0.5
    return eye + (mouth - eye) * 0.1


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """torch grid_sample(bilinear, zeros padding, align_corners=False) of an (H, W, 3) UV texture at (P, 2) UVs.

    DECA's grid is (2u - 1, 1 - 2v): texel column u W - 0.5, row (1 - v) H - 0.5 (v = 1 is the top row).
    """
    h, w = texture.shape[:2]
    padded = np.pad(np.asarray(texture, np.float32), ((1, 1), (1, 1), (0, 0)))  # zeros padding, as grid_sample
    x = np.asarray(uv[:, 0], np.float64) * w - 0.5
    y = (1.0 - np.asarray(uv[:, 1], np.float64)) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32)[:, None], (y - y0).astype(np.float32)[:, None]
    # +1 for the pad; anything beyond it lands on the zero border
    xi = np.clip(x0.astype(np.int64) + 1, 0, w + 1), np.clip(x0.astype(np.int64) + 2, 0, w + 1)
    yi = np.clip(y0.astype(np.int64) + 1, 0, h + 1), np.clip(y0.astype(np.int64) + 2, 0, h + 1)
    return ((1 - fx) * (1 - fy) * padded[yi[0], xi[0]] + fx * (1 - fy) * padded[yi[0], xi[1]]
            + (1 - fx) * fy * padded[yi[1], xi[0]] + fx * fy * padded[yi[1], xi[1]])


def deca_shading(normals: np.ndarray, light: np.ndarray) -> np.ndarray:
    """DECA's add_SHlight: basis [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1] x constant_factor, @ (9, 3) light."""
    n = np.asarray(normals, np.float64)
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x**2 - y**2, 3 * z**2 - 1], 1)
    return (basis * DECA_SH_CONSTANTS) @ np.asarray(light, np.float64).reshape(9, 3)


def render_uv_textured(mesh: np.ndarray, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray,
                       texture: np.ndarray, light: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """DECA's SRenderY image: (size, size, 3) uint8 albedo(UV) x SH shading on black, and its coverage.

    mesh: (V, 3) image-frame vertices in crop pixels; normals are taken in the view frame (= DECA's world
    axes: its camera is a scale and a shift), area-weighted per vertex, interpolated without renormalising.
    """
    from rigface.face.render import rasterize

    normals = geometry.vertex_normals(geometry.image_to_view(mesh), faces)
    pix, tid, bary = rasterize(mesh, faces, size)
    b = bary.astype(np.float32)
    uv = np.einsum("pk,pkc->pc", b, np.asarray(uvs, np.float32)[uv_faces[tid]])
    n = np.einsum("pk,pkc->pc", b, normals[faces[tid]])
    color = sample_texture(texture, uv) * deca_shading(n, light)
    image = np.zeros((size * size, 3), np.uint8)
    image[pix] = (np.clip(color, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # torchvision save_image's rounding
    cover = np.zeros(size * size, bool)
    cover[pix] = True
    return image.reshape(size, size, 3), cover.reshape(size, size)


class DecaFitError(ValueError):
    """DECA's codes give no usable face in the crop (non-finite codes, camera scale <= 0)."""


def fit_deca(deca: Deca, crop: np.ndarray, face_box: tuple[float, float, float, float]) -> dict[str, Any]:
    """Everything a FaceFit needs from DECA, for a crop and its 68-landmark box (crop pixels).

    Returns pose, transform, lighting (project SH), albedo (the texture at each vertex's UV), mesh, shape,
    triangles and `deca`: the codes, the DECA box and the asset files the renders (render_deca) load.
    """
    box = deca_box(face_box)
    codes = deca.encode(extract_deca_crop(crop, box))
    if not all(np.isfinite(v).all() for v in codes.values()):
        raise DecaFitError("DECA gave non-finite codes")
    if codes["cam"][0] <= 0:
        raise DecaFitError(f"DECA camera scale {codes['cam'][0]:.4g} <= 0: no face in the DECA crop")
    geo = place_mesh(deca.flame, codes, box)
    triangles = deca.uv.faces
    lighting = deca_sh_to_project(codes["light"])
    albedo = sample_texture(deca.texture(codes["tex"]), deca.uv.vertex_uvs())
    yaw, pitch, roll = geometry.euler_from_rotation(geo.rotation)
    tx, ty, tz = geometry.view_to_image(geo.translation.astype(np.float32))
    return {
        "pose": Pose(yaw=yaw, pitch=pitch, roll=roll, translation=(float(tx), float(ty), float(tz)), scale=geo.scale),
        "transform": geometry.similarity_matrix(geo.scale, geo.rotation, geo.translation),
        "lighting": lighting,
        "albedo": np.clip(albedo, 0.0, 1.0),
        "mesh": geo.mesh,
        "shape": geo.shape,
        "triangles": triangles,
        "deca": {"codes": codes, "box": tuple(float(v) for v in box), **deca.assets},
    }


# Which fit gives each group of DECA codes, per edit: the authors' compute_renders.py. 'head' = shape, tex,
# cam, global pose, the DECA box (crop frame) and the align_ffhq centre; 'expression' = exp + jaw pose;
# 'light' = the 27 SH codes. Their script takes the target's light for expression-only edits and keeps the
# source's for lighting edits (`if 'light' not in mode_list: code1['light'] = tar_code['light']`), the
# inverse of the paper's lighting edit; this table follows the paper.
DECA_CODE_SOURCES: dict[str, dict[str, str]] = {
    "expression": {"head": "source", "expression": "target", "light": "source"},
    "pose": {"head": "target", "expression": "source", "light": "source"},
    "lighting": {"head": "source", "expression": "source", "light": "target"},
    "all": {"head": "target", "expression": "target", "light": "target"},
}


def swap_codes(head: dict[str, np.ndarray], expression: dict[str, np.ndarray], light: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """The head's codes with the expression (exp + jaw) and the SH light of the other two."""
    out = {k: np.array(v, copy=True) for k, v in head.items()}
    out["exp"] = np.array(expression["exp"], copy=True)
    out["pose"][3:6] = expression["pose"][3:6]
    out["light"] = np.array(light["light"], copy=True)
    return out


def codes_for_edit(source: dict[str, np.ndarray], target: dict[str, np.ndarray], edit: str
                   ) -> tuple[dict[str, np.ndarray], str]:
    """(the swapped codes, which fit's head/frame they live in) per DECA_CODE_SOURCES."""
    if edit not in DECA_CODE_SOURCES:
        raise ValueError(f"edit must be one of {', '.join(DECA_CODE_SOURCES)}, got {edit!r}")
    role = DECA_CODE_SOURCES[edit]
    by = {"source": source, "target": target}
    return swap_codes(by[role["head"]], by[role["expression"]], by[role["light"]]), role["head"]


def _assets(fit: FaceFit) -> dict[str, Any]:
    deca = fit.deca
    missing = [f"{k}: {deca.get(k)}" for k in ("flame", "texture", "uv", "landmarks")
               if not deca.get(k) or not Path(deca[k]).exists()]
    if missing:  # fits shipped to another machine: the files must be at the same paths there
        raise WeightFileMissing("DECA assets of this fit not found on this machine (FLAME model, texture, UV, "
                                "landmarks): " + "; ".join(missing))
    return {"flame": cached_flame(deca["flame"]), "texture": cached_asset("texture", deca["texture"]),
            "uv": cached_asset("uv", deca["uv"]), "landmarks": cached_asset("landmarks", deca["landmarks"])}


def render_deca(head_fit: FaceFit, expression_fit: FaceFit, light_fit: FaceFit, size: int) -> np.ndarray:
    """DECA render of `head_fit`'s head (shape, tex, cam, global pose, crop frame) with the other fits'
    expression (exp + jaw) and SH light, re-centred as align_ffhq does; in a size x size crop."""
    for role, fit in (("head", head_fit), ("expression", expression_fit), ("light", light_fit)):
        if fit.deca is None:
            raise ValueError(f"the {role} fit is not a DECA fit (fit='deca'): fits from different 3D backends "
                             "cannot be re-posed together")
    a = _assets(head_fit)
    own = head_fit.deca["codes"]
    codes = swap_codes(own, expression_fit.deca["codes"], light_fit.deca["codes"])
    flame_faces = a["flame"].faces.numpy()  # DECA's landmarks sit on the FLAME model's faces
    delta = (ffhq_center(a["flame"], own, a["landmarks"], flame_faces)
             - ffhq_center(a["flame"], codes, a["landmarks"], flame_faces))
    geo = place_mesh(a["flame"], codes, head_fit.deca["box"], world_offset=delta)
    mesh = geo.mesh * np.float32(size / head_fit.crop_size)  # crops of another size: rescale the frame
    image, _ = render_uv_textured(mesh, a["uv"].faces, a["uv"].uvs, a["uv"].uv_faces, a["texture"](codes["tex"]),
                                  np.asarray(codes["light"]).reshape(9, 3), size)
    return image


def render_deca_edit(source: FaceFit, target: FaceFit, edit: str, size: int | None = None) -> np.ndarray:
    """The render of one edit, codes taken per DECA_CODE_SOURCES."""
    if edit not in DECA_CODE_SOURCES:
        raise ValueError(f"edit must be one of {', '.join(DECA_CODE_SOURCES)}, got {edit!r}")
    by = {"source": source, "target": target}
    role = DECA_CODE_SOURCES[edit]
    head = by[role["head"]]
    return render_deca(head, by[role["expression"]], by[role["light"]], size or head.crop_size)
