"""Deep3DFaceRecon (Deng et al. 2019): ResNet-50 regressor of BFM coefficients, and the BFM face model.

Two checkpoint layouts, told apart by their keys (both: `backbone.*` = torchvision's ResNet-50 without fc):
- `face_adapter`: Face-Adapter's `d3dfr_res50_nofc.pth`, the one the RigFace authors use. Eight 1x1-conv heads
  under `fianl_layers.{0..7}` (sic, the published spelling): id 80, exp 64, tex 80, angle 3, gamma 27, t 2,
  t 1, pupil 4 (261 outputs). Input 256 px RGB in [-1, 1]; the five points are mapped by a least-squares
  similarity (with rotation) onto the ArcFace template scaled to 256 (ARCFACE_TEMPLATE x 2, +16 px in x:
  Face-Adapter's `mean_face_lm5p_256`), bilinear warp.
- `deep3d`: the original `epoch_20.pth` (a dict whose 'net_recon' entry is the ReconNetWrapper state dict),
  seven heads under `final_layers.{0..6}` (257 outputs). Input 224 px RGB in [0, 1]; alignment by POS: the five
  points are fitted to the BFM's five 3D landmarks (scale + translation, no rotation), the image is rescaled so
  that the face has the training size (102 px at 224) and cropped around it.
Both regress the same BFM basis; expression = coefficients 80:144.
Face model: `BFM_model_front.mat` (meanshape, idBase, exBase, meantex, texBase, tri, point_buf, keypoints).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigface.face.backends.nets import resnet50
from rigface.face.backends.weights import WeightFormatError, load_exact, load_torch_checkpoint, strip_prefix

log = logging.getLogger(__name__)

COEFF_SPLITS = {"id": 80, "exp": 64, "tex": 80, "angle": 3, "gamma": 27, "trans": 3}
NUM_COEFFS = sum(COEFF_SPLITS.values())  # 257
TRAIN_SIZE = 224
FOCAL_224 = 1015.0
RESCALE_224 = 102.0
CAMERA_DISTANCE = 10.0


@dataclass(frozen=True)
class Variant:
    """One published Deep3DFaceRecon checkpoint layout and how its input is made."""

    name: str
    head_attr: str  # the ModuleList's attribute name in the checkpoint
    heads: tuple[int, ...]
    input_size: int
    input_range: tuple[float, float]  # pixel 0 -> [0], pixel 255 -> [1]
    alignment: str  # "similarity" (least squares, with rotation) or "pos"


FACE_ADAPTER = Variant("face_adapter", "fianl_layers", (80, 64, 80, 3, 27, 2, 1, 4), 256, (-1.0, 1.0), "similarity")
ORIGINAL = Variant("deep3d", "final_layers", (80, 64, 80, 3, 27, 2, 1), 224, (0.0, 1.0), "pos")
VARIANTS = {v.name: v for v in (FACE_ADAPTER, ORIGINAL)}


class ReconNet(nn.Module):
    """ResNet-50 trunk + 1x1 conv heads on the pooled feature, named as in the variant's checkpoint."""

    def __init__(self, variant: Variant = FACE_ADAPTER):
        super().__init__()
        self.variant = variant
        self.backbone = resnet50(num_classes=None)
        setattr(self, variant.head_attr, nn.ModuleList([nn.Conv2d(2048, d, 1, bias=True) for d in variant.heads]))

    @property
    def heads(self) -> nn.ModuleList:
        return getattr(self, self.variant.head_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone.avgpool(self.backbone.features(x)[-1])
        return torch.flatten(torch.cat([layer(feat) for layer in self.heads], 1), 1)


def variant_of(state: dict, source: str = "checkpoint") -> Variant:
    """The layout a state dict has, from its keys; WeightFormatError naming the keys that fit neither."""
    for v in VARIANTS.values():
        if any(k.startswith(v.head_attr + ".") for k in state):
            return v
    odd = sorted(k for k in state if not k.startswith("backbone."))
    shown = ", ".join(odd[:6]) + (f" (+{len(odd) - 6} more)" if len(odd) > 6 else "")
    raise WeightFormatError(
        f"{source} is neither Deep3DFaceRecon layout (Face-Adapter's d3dfr_res50_nofc.pth with fianl_layers.0-7, "
        f"or epoch_20.pth with final_layers.0-6); unexpected keys: {shown or 'none besides backbone.*'}"
    )


def split_coeffs(coeffs: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """(..., 257) -> {'id', 'exp', 'tex', 'angle' (radians x, y, z), 'gamma', 'trans'}."""
    c = coeffs.detach().cpu().numpy() if isinstance(coeffs, torch.Tensor) else np.asarray(coeffs)
    if c.shape[-1] != NUM_COEFFS:
        raise ValueError(f"expected {NUM_COEFFS} coefficients, got {c.shape[-1]}")
    out, i = {}, 0
    for name, n in COEFF_SPLITS.items():
        out[name] = c[..., i : i + n].astype(np.float32)
        i += n
    return out


def load_reconnet(path: str | Path) -> ReconNet:
    """Either published layout (see the module doc), chosen by the file's keys; exact keys and shapes."""
    obj = load_torch_checkpoint(Path(path))
    if not isinstance(obj, dict):
        raise WeightFormatError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = obj.get("net_recon", obj)  # epoch_20.pth wraps it; Face-Adapter's file is flat
    if not isinstance(state, dict):
        raise WeightFormatError(f"{path}: 'net_recon' is a {type(state).__name__}, not a state dict")
    state = strip_prefix(state, "module.")
    net = ReconNet(variant_of(state, str(path)))
    load_exact(net, state, str(path))
    return net.eval()


# -- BFM ---------------------------------------------------------------------------------------------------
@dataclass
class BFM:
    """The front BFM as Deep3DFaceRecon uses it; vertices in BFM units (dm), mean shape centred at 0."""

    mean_shape: np.ndarray  # (N, 3)
    id_base: np.ndarray  # (3N, 80)
    exp_base: np.ndarray  # (3N, 64)
    mean_tex: np.ndarray  # (N, 3) in 0..255
    tex_base: np.ndarray  # (3N, 80)
    triangles: np.ndarray  # (F, 3) 0-based
    keypoints: np.ndarray  # (68,) 0-based vertex indices

    @property
    def num_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    def five_points_3d(self) -> np.ndarray:
        """(5, 3): image-left eye centre, image-right eye centre, nose tip, image-left and right mouth corners."""
        return five_from_68(self.mean_shape[self.keypoints])

    def shape(self, id_coeff: np.ndarray, exp_coeff: np.ndarray) -> np.ndarray:
        flat = self.id_base @ np.asarray(id_coeff, np.float32) + self.exp_base @ np.asarray(exp_coeff, np.float32)
        return flat.reshape(-1, 3) + self.mean_shape

    def texture(self, tex_coeff: np.ndarray) -> np.ndarray:
        """(N, 3) albedo in [0, 1]."""
        flat = self.tex_base @ np.asarray(tex_coeff, np.float32)
        return np.clip((flat.reshape(-1, 3) + self.mean_tex) / 255.0, 0.0, 1.0)


def five_from_68(lm68: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's 68 -> 5 rule: eye centres from the eye corners, nose tip, mouth corners."""
    lm = np.asarray(lm68)
    return np.stack(
        [lm[[36, 39]].mean(0), lm[[42, 45]].mean(0), lm[30], lm[48], lm[54]], 0
    ).astype(np.float32)


_BFM_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "keypoints")


def load_bfm(path: str | Path) -> BFM:
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except Exception as exc:
        raise WeightFormatError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in _BFM_KEYS if k not in m]
    if missing:
        raise WeightFormatError(f"{path}: not a BFM_model_front.mat, missing {', '.join(missing)}")
    mean = np.asarray(m["meanshape"], np.float32).reshape(-1, 3)
    n = mean.shape[0]
    expect = {"idBase": (3 * n, 80), "exBase": (3 * n, 64), "texBase": (3 * n, 80)}
    for key, shape in expect.items():
        if tuple(m[key].shape) != shape:
            raise WeightFormatError(f"{path}: {key} has shape {m[key].shape}, expected {shape} for {n} vertices")
    if m["meantex"].size != 3 * n:
        raise WeightFormatError(f"{path}: meantex has {m['meantex'].size} values, expected {3 * n}")
    tri = np.asarray(m["tri"], np.int64) - 1
    kp = np.asarray(m["keypoints"], np.int64).ravel() - 1
    if tri.ndim != 2 or tri.shape[1] != 3 or tri.min() < 0 or tri.max() >= n:
        raise WeightFormatError(f"{path}: tri must be (F, 3) 1-based indices below {n}")
    if kp.shape != (68,) or kp.min() < 0 or kp.max() >= n:
        raise WeightFormatError(f"{path}: keypoints must be 68 1-based vertex indices below {n}")
    return BFM(
        mean_shape=mean - mean.mean(0, keepdims=True),  # centred, as Deep3DFaceRecon does
        id_base=np.asarray(m["idBase"], np.float32),
        exp_base=np.asarray(m["exBase"], np.float32),
        mean_tex=np.asarray(m["meantex"], np.float32).reshape(-1, 3),
        tex_base=np.asarray(m["texBase"], np.float32),
        triangles=tri,
        keypoints=kp,
    )


def load_lm3d(path: str | Path) -> np.ndarray:
    """similarity_Lm3D_all.mat ('lm': 68 x 3) -> its five 3D points."""
    from scipy.io import loadmat

    lm = np.asarray(loadmat(str(path)).get("lm", np.zeros(0)), np.float32)
    if lm.shape != (68, 3):
        raise WeightFormatError(f"{path}: expected 'lm' of shape (68, 3), got {lm.shape}")
    return five_from_68(lm)


# -- geometry ----------------------------------------------------------------------------------------------
def rotation(angles: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's R = Rz Ry Rx (radians); posed = R @ v. BFM axes = the project's view axes."""
    x, y, z = (float(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))
# Deep3DFaceRecon's SH basis factors (signs included), in the project's band order (1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2).
_D3D_SH = np.array(
    [_A[0] * _C[0], -_A[1] * _C[1], _A[1] * _C[1], -_A[1] * _C[1], _A[2] * _C[2], -_A[2] * _C[2],
     0.5 * _A[2] * _C[2] / math.sqrt(3.0), -_A[2] * _C[2], 0.5 * _A[2] * _C[2]]
)
_PROJECT_SH = np.array([0.2820948, 0.4886025, 0.4886025, 0.4886025, 1.0925484, 1.0925484, 0.3153916, 1.0925484, 0.5462742])
INIT_LIGHT = 0.8  # Deep3DFaceRecon adds this to every channel's DC term


def gamma_to_lighting(gamma: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's 27 SH gammas -> the project's (9, 3) lighting (same band order and axes)."""
    g = np.asarray(gamma, np.float64).reshape(3, 9).T.copy()  # (9, 3): per band, per RGB channel
    g[0] += INIT_LIGHT
    return (g * (_D3D_SH / _PROJECT_SH)[:, None]).astype(np.float32)


def pos_fit(points_2d: np.ndarray, points_3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's POS: least-squares affine camera; returns (translation (2,), mean scale)."""
    n = len(points_2d)
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = points_3d
    a[0::2, 3] = 1
    a[1::2, 4:7] = points_3d
    a[1::2, 7] = 1
    k = np.linalg.lstsq(a, np.asarray(points_2d, np.float64).reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2.0
    return np.array([k[3], k[7]]), float(scale)


def alignment_matrix(five_points: np.ndarray, image_height: int, lm3d5: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine from image pixels to the network input (size x size), as Deep3DFaceRecon's align_img.

    The five points are fitted in a y-up frame (Deep3DFaceRecon flips y), the image is scaled so the face
    has the training size (102 px per BFM unit at 224, proportionally at other sizes), centred on the fit.
    """
    p = np.asarray(five_points, np.float64).copy()
    p[:, 1] = image_height - 1 - p[:, 1]
    t, s = pos_fit(p, lm3d5)
    if not np.isfinite(s) or s <= 1e-8:
        raise ValueError("degenerate five-point fit")
    k = RESCALE_224 * size / TRAIN_SIZE / s
    left = t[0] * k - size / 2.0
    up = (image_height - 1 - t[1]) * k - size / 2.0  # back to y-down pixels
    return np.array([[k, 0.0, -left], [0.0, k, -up]], np.float32)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity [[a, -b, tx], [b, a, ty]] minimising sum |M src + t - dst|^2 (rotation allowed).

    The linear least-squares problem Face-Adapter's get_affine_transform solves by its normal equations.
    """
    p, q = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n = len(p)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([p[:, 0], -p[:, 1], np.ones(n), np.zeros(n)], 1)
    a[1::2] = np.stack([p[:, 1], p[:, 0], np.zeros(n), np.ones(n)], 1)
    (ca, cb, tx, ty), *_ = np.linalg.lstsq(a, q.reshape(-1), rcond=None)
    if not np.isfinite([ca, cb, tx, ty]).all() or math.hypot(ca, cb) <= 1e-8:
        raise ValueError("degenerate five points: no similarity to the template")
    return np.array([[ca, -cb, tx], [cb, ca, ty]], np.float64)


def face_adapter_template(size: int = 256) -> np.ndarray:
    """Face-Adapter's `mean_face_lm5p_256`: the ArcFace 112-px template x 2, +16 px in x (other sizes: scaled)."""
    from rigface.face.backends.insightface import ARCFACE_TEMPLATE

    t = ARCFACE_TEMPLATE.astype(np.float64) * 2.0 + np.array([16.0, 0.0])
    return t * (size / 256.0)


@dataclass
class Deep3DResult:
    coeffs: dict[str, np.ndarray]  # split 257 coefficients (+ 'pupil' (4,) for the Face-Adapter variant)
    expression: np.ndarray  # (64,) float32 = coefficients 80:144
    angles_deg: tuple[float, float, float]  # project convention (yaw, pitch, roll)
    lighting: np.ndarray  # (9, 3) project SH lighting
    affine: np.ndarray  # 2x3 image -> network input


class Deep3DFaceRecon:
    """`Deep3DFaceRecon(checkpoint, bfm)(rgb, five_points) -> Deep3DResult`. Thread-safe (serialised).

    The variant (input size, range, alignment) follows the checkpoint's layout; `input_size` overrides the size.
    """

    name = "deep3d"

    def __init__(self, checkpoint: str | Path, bfm: str | Path, lm3d: str | Path | None = None,
                 input_size: int | None = None, device: str = "cpu"):
        self.bfm = load_bfm(bfm)
        self.lm3d5 = load_lm3d(lm3d) if lm3d is not None else self.bfm.five_points_3d()
        self.net = load_reconnet(checkpoint).to(device)
        self.variant = self.net.variant
        self.input_size = int(input_size or self.variant.input_size)
        self.device = device
        self.version = f"{self.variant.name}/{Path(checkpoint).name}@{self.input_size}"
        self._lock = threading.Lock()

    def alignment(self, rgb_shape: tuple[int, ...], five_points: np.ndarray) -> np.ndarray:
        """2x3 affine from image pixels to the network input, by the variant's rule."""
        if self.variant.alignment == "similarity":
            return similarity_lstsq(five_points, face_adapter_template(self.input_size)).astype(np.float32)
        return alignment_matrix(five_points, rgb_shape[0], self.lm3d5, self.input_size)

    def align(self, rgb: np.ndarray, five_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        m = self.alignment(rgb.shape, five_points)
        size = self.input_size
        # Face-Adapter warps bilinearly; Deep3DFaceRecon resizes with PIL's bicubic.
        interp = cv2.INTER_LINEAR if self.variant.alignment == "similarity" else cv2.INTER_CUBIC
        aligned = cv2.warpAffine(rgb, m, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT)
        return aligned, m

    def to_input(self, aligned_rgb: np.ndarray) -> torch.Tensor:
        """(1, 3, S, S) float: pixels 0..255 mapped linearly onto the variant's input range."""
        lo, hi = self.variant.input_range
        x = torch.from_numpy(np.ascontiguousarray(aligned_rgb)).float().div(255.0).permute(2, 0, 1)[None]
        return x * (hi - lo) + lo

    @torch.no_grad()
    def regress(self, aligned_rgb: np.ndarray) -> np.ndarray:
        x = self.to_input(aligned_rgb)
        with self._lock:
            out = self.net(x.to(self.device))
        return out[0].float().cpu().numpy()

    def __call__(self, rgb: np.ndarray, five_points: np.ndarray) -> Deep3DResult:
        from rigface.face.geometry import euler_from_rotation

        aligned, m = self.align(rgb, five_points)
        out = self.regress(aligned)
        c = split_coeffs(out[:NUM_COEFFS])
        if out.shape[0] > NUM_COEFFS:
            c["pupil"] = out[NUM_COEFFS:].astype(np.float32)
        yaw, pitch, roll = euler_from_rotation(rotation(c["angle"]))
        return Deep3DResult(c, c["exp"].copy(), (yaw, pitch, roll), gamma_to_lighting(c["gamma"]), m)
    def reconstruct(self, coeffs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Posed vertices projected into the network input ((N, 2) pixels, y down) and their depth (N,)."""
        v = self.bfm.shape(coeffs["id"], coeffs["exp"]) @ rotation(coeffs["angle"]).T + coeffs["trans"]
        z = CAMERA_DISTANCE - v[:, 2]
        focal = FOCAL_224 * self.input_size / TRAIN_SIZE
        centre = self.input_size / 2.0
        xy = np.stack([focal * v[:, 0] / z + centre, self.input_size - (focal * v[:, 1] / z + centre)], 1)
        return xy.astype(np.float32), z.astype(np.float32)
