"""The FLAME head model (Li et al. 2017) as a torch layer, and a chumpy-free reader for FLAME2020's pickle.

`generic_model.pkl` is a Python-2 pickle whose arrays are chumpy `Ch` objects and whose J_regressor is a
scipy sparse matrix. `load_flame_pickle` unpickles with an allow-list: numpy and scipy.sparse classes load
as themselves, chumpy classes as inert stand-ins whose array is taken from their state ('x'), and anything
else is refused. chumpy itself is never imported or installed.

LBS follows FLAME/SMPL: shape+expression blendshapes, joints regressed from the shaped template, pose
correctives from (R - I) of the four non-root joints, then linear blend skinning over five joints
(global, neck, jaw, left eye, right eye).
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigface.face.backends.weights import WeightFormatError

NUM_JOINTS = 5
JAW_JOINT = 2
_FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")


class _ChumpyStandIn:
    """Takes the place of chumpy.ch.Ch (and friends) while unpickling: keeps the state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def array(self) -> np.ndarray:
        if "x" in self.state:
            return np.asarray(self.state["x"])
        raise WeightFormatError(f"a chumpy object without an 'x' array (keys {sorted(self.state)[:6]})")


class _AllowListUnpickler(pickle.Unpickler):
    """Admits exactly what a FLAME pickle holds: numpy arrays, scipy sparse matrices, chumpy stand-ins.

    An explicit (module, name) list, not module prefixes: numpy itself has callables (e.g. in numpy.testing) that
    execute strings, so "anything from numpy" would let a crafted file run code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("_codecs", "encode"),
    } | {(mod, name) for mod in ("__builtin__", "builtins") for name in ("object", "set", "frozenset", "bytes")}
    _SPARSE = {"csc_matrix", "csr_matrix", "coo_matrix"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "chumpy":
            return _ChumpyStandIn
        if (module, name) in self._ALLOWED:
            return super().find_class(module.replace("copy_reg", "copyreg").replace("__builtin__", "builtins"), name)
        if module.startswith("scipy.sparse") and name in self._SPARSE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a FLAME model file")


def _to_array(value) -> np.ndarray:
    if isinstance(value, _ChumpyStandIn):
        return value.array()
    if hasattr(value, "toarray"):  # scipy sparse
        return value.toarray()
    return np.asarray(value)


def load_flame_pickle(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            raw = _AllowListUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise WeightFormatError(f"{path}: not a FLAME model pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict) or any(k not in raw for k in _FLAME_KEYS):
        have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise WeightFormatError(f"{path}: a FLAME model needs {', '.join(_FLAME_KEYS)}; found {have}")
    model = {k: _to_array(raw[k]) for k in _FLAME_KEYS}
    n = model["v_template"].shape[0]
    checks = {
        "v_template": model["v_template"].shape == (n, 3),
        "shapedirs": model["shapedirs"].ndim == 3 and model["shapedirs"].shape[:2] == (n, 3),
        "posedirs": model["posedirs"].shape == (n, 3, 9 * (NUM_JOINTS - 1)),
        "J_regressor": model["J_regressor"].shape == (NUM_JOINTS, n),
        "kintree_table": model["kintree_table"].shape == (2, NUM_JOINTS),
        "weights": model["weights"].shape == (n, NUM_JOINTS),
        "f": model["f"].ndim == 2 and model["f"].shape[1] == 3,
    }
    bad = [f"{k} {model[k].shape}" for k, ok in checks.items() if not ok]
    if bad:
        raise WeightFormatError(f"{path}: wrong FLAME array shapes for {n} vertices: {', '.join(bad)}")
    return model


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """(B, 3) axis-angle -> (B, 3, 3) rotation matrices."""
    angle = torch.linalg.norm(axis_angle + 1e-8, dim=1, keepdim=True)
    axis = axis_angle / angle
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    zeros = torch.zeros_like(x)
    k = torch.stack([zeros, -z, y, z, zeros, -x, -y, x, zeros], 1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)[None]
    return eye + sin * k + (1 - cos) * torch.bmm(k, k)


class FLAME(nn.Module):
    """`FLAME(model)(shape, expression, pose) -> (B, N, 3)` vertices; pose = DECA's (global 3, jaw 3) axis-angle."""

    def __init__(self, model: dict[str, np.ndarray], n_shape: int = 100, n_exp: int = 50):
        super().__init__()
        sd = model["shapedirs"]
        if sd.shape[2] < 300 + n_exp or n_shape > 300:
            raise WeightFormatError(f"shapedirs has {sd.shape[2]} components; FLAME2020 has 300 shape + 100 expression")
        dirs = np.concatenate([sd[:, :, :n_shape], sd[:, :, 300 : 300 + n_exp]], 2)
        f32 = torch.float32
        self.register_buffer("v_template", torch.as_tensor(model["v_template"], dtype=f32))
        self.register_buffer("shapedirs", torch.as_tensor(dirs, dtype=f32))
        self.register_buffer("posedirs", torch.as_tensor(model["posedirs"].reshape(-1, 36).T, dtype=f32))
        self.register_buffer("J_regressor", torch.as_tensor(model["J_regressor"], dtype=f32))
        self.register_buffer("lbs_weights", torch.as_tensor(model["weights"], dtype=f32))
        self.register_buffer("faces", torch.as_tensor(model["f"].astype(np.int64)))
        parents = model["kintree_table"][0].astype(np.int64).copy()
        parents[0] = -1
        self.parents = parents.tolist()
        self.n_shape, self.n_exp = n_shape, n_exp

    def root_joint(self, shape: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """(B, 3) the global (root) joint: the point the global pose rotates the whole head about."""
        betas = torch.cat([shape, expression], 1)
        v_shaped = self.v_template[None] + torch.einsum("bl,nkl->bnk", betas, self.shapedirs)
        return torch.einsum("n,bnk->bk", self.J_regressor[0], v_shaped)

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
                neck_pose: torch.Tensor | None = None, eye_pose: torch.Tensor | None = None) -> torch.Tensor:
        b = shape.shape[0]
        betas = torch.cat([shape, expression], 1)
        v_shaped = self.v_template[None] + torch.einsum("bl,nkl->bnk", betas, self.shapedirs)
        joints = torch.einsum("jn,bnk->bjk", self.J_regressor, v_shaped)
        neck = neck_pose if neck_pose is not None else pose.new_zeros(b, 3)
        eyes = eye_pose if eye_pose is not None else pose.new_zeros(b, 6)
        full = torch.cat([pose[:, :3], neck, pose[:, 3:6], eyes], 1).view(-1, 3)
        rot = rodrigues(full).view(b, NUM_JOINTS, 3, 3)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(b, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(b, -1, 3)
        transforms = self._rigid(rot, joints)  # (B, J, 4, 4)
        t = torch.einsum("nj,bjkl->bnkl", self.lbs_weights, transforms)
        homo = torch.cat([v_posed, v_posed.new_ones(b, v_posed.shape[1], 1)], 2)
        return torch.einsum("bnkl,bnl->bnk", t, homo)[..., :3]

    def _rigid(self, rot: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        rel = joints.clone()
        for j, p in enumerate(self.parents):
            if p >= 0:
                rel[:, j] = joints[:, j] - joints[:, p]
        b = rot.shape[0]
        local = torch.zeros(b, NUM_JOINTS, 4, 4, dtype=rot.dtype, device=rot.device)
        local[:, :, :3, :3] = rot
        local[:, :, :3, 3] = rel
        local[:, :, 3, 3] = 1
        chain = [local[:, 0]]
        for j in range(1, NUM_JOINTS):
            chain.append(chain[self.parents[j]] @ local[:, j])
        world = torch.stack(chain, 1)
        # Remove the rest-pose joint location: the transform maps rest vertices, not joint-local ones.
        posed_joints = torch.einsum("bjkl,bjl->bjk", world[:, :, :3, :3], joints)
        world = world.clone()
        world[:, :, :3, 3] = world[:, :, :3, 3] - posed_joints
        return world


_CACHE: dict[str, FLAME] = {}
_CACHE_LOCK = threading.Lock()


def cached_flame(path: str | Path) -> FLAME:
    """One FLAME layer per model file and process, shared by the DECA encoder and the re-posed renders.

    Its forward is stateless, so threads may share it.
    """
    key = str(Path(path).expanduser().resolve())
    with _CACHE_LOCK:
        flame = _CACHE.get(key)
        if flame is None:
            flame = _CACHE[key] = FLAME(load_flame_pickle(key)).eval()
        return flame
