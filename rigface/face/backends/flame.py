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


# -- DECA's FLAME assets: UV layout, texture space, landmark embedding ---------------------------------------
class HeadTemplate:
    """`head_template.obj` (DECA's data folder): FLAME's faces and their UV layout (v, vt, f v/vt lines)."""

    def __init__(self, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray, n_vertices: int):
        self.faces, self.uvs, self.uv_faces, self.n_vertices = faces, uvs, uv_faces, n_vertices

    def vertex_uvs(self) -> np.ndarray:
        """(V, 2) one UV per vertex (its first use; seams hold two), for per-vertex albedo."""
        out = np.zeros((self.n_vertices, 2), np.float32)
        for k in (2, 1, 0):  # written in reverse so the first use wins
            out[self.faces[::-1, k]] = self.uvs[self.uv_faces[::-1, k]]
        return out


def load_head_template(path: str | Path) -> HeadTemplate:
    verts = uvs = 0
    faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
    uv_list: list[tuple[float, float]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                tag, _, rest = line.strip().partition(" ")
                if tag == "v":
                    verts += 1
                elif tag == "vt":
                    u, v = rest.split()[:2]
                    uv_list.append((float(u), float(v)))
                    uvs += 1
                elif tag == "f":
                    corners = [c.split("/") for c in rest.split()]
                    if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                        raise ValueError(f"face line without 3 v/vt corners: {line.strip()[:60]!r}")
                    faces.append([int(c[0]) - 1 for c in corners])
                    uv_faces.append([int(c[1]) - 1 for c in corners])
    except (OSError, ValueError, UnicodeError) as exc:
        raise WeightFormatError(f"{path}: not DECA's head_template.obj ({type(exc).__name__}: {exc})") from exc
    f, uf = np.asarray(faces, np.int64).reshape(-1, 3), np.asarray(uv_faces, np.int64).reshape(-1, 3)
    if not len(f) or not uvs or f.min() < 0 or f.max() >= verts or uf.min() < 0 or uf.max() >= uvs:
        raise WeightFormatError(f"{path}: needs v, vt and 'f v/vt' lines with indices in range "
                                f"({verts} vertices, {uvs} uvs, {len(f)} faces)")
    return HeadTemplate(f, np.asarray(uv_list, np.float32), uf, verts)


class FlameTexture:
    """DECA's FLAMETex(tex_type='FLAME'): mean + the first n texture directions, /255, resized to uv_size, RGB.

    `FLAME_texture.npz` holds 'mean' (N, N, 3) and 'tex_dir' (N, N, 3, K) in BGR 0..255 (N 512, K 200).
    DECA resizes to 256 by nearest neighbour after the linear combination; the same rows and columns are
    taken here before it (the combination is per texel), which keeps 50 of K directions at 256: ~39 MB.
    """

    def __init__(self, mean: np.ndarray, basis: np.ndarray):
        self.mean, self.basis = mean, basis  # (S, S, 3), (S, S, 3, n) RGB in [0, 1] units

    def __call__(self, tex_code: np.ndarray) -> np.ndarray:
        """(S, S, 3) float32 albedo texture (not clipped, as DECA's), RGB, row 0 = top of the UV map (v = 1)."""
        code = np.asarray(tex_code, np.float32).ravel()[: self.basis.shape[-1]]
        return self.mean + self.basis[..., : len(code)] @ code


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    from numpy.lib import format as npformat

    major, _ = npformat.read_magic(fh)
    read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
    return read(fh)


def _nearest_rows(n_in: int, n_out: int) -> np.ndarray:
    """torch's F.interpolate(mode='nearest') source index for each output index."""
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _read_npz_member_rows(path: str | Path, name: str, rows: np.ndarray, cols: np.ndarray, depth: int
                          ) -> tuple[np.ndarray, tuple[int, ...]]:
    """member[rows][:, cols][..., :depth] of an .npz array, read row by row (the full tex_dir is ~0.6-1.2 GB)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        with zf.open(name + ".npy") as fh:
            shape, fortran, dtype = _npy_header(fh)
            if fortran or dtype.hasobject or len(shape) < 3:
                raise WeightFormatError(f"{path}: {name} is not a C-order numeric (N, N, 3, ...) array")
            row_items = int(np.prod(shape[1:]))
            keep = set(rows.tolist())
            out = []
            for r in range(shape[0]):
                buf = fh.read(row_items * dtype.itemsize)
                if len(buf) != row_items * dtype.itemsize:
                    raise WeightFormatError(f"{path}: {name} is truncated at row {r}")
                if r in keep:
                    row = np.frombuffer(buf, dtype).reshape(shape[1:])[cols]
                    out.append(row[..., :depth] if len(shape) == 4 else row)
    by_row = dict(zip(sorted(keep), out))
    return np.stack([by_row[r] for r in rows.tolist()]).astype(np.float32), tuple(shape)


def load_flame_texture(path: str | Path, n_tex: int = 50, uv_size: int = 256) -> FlameTexture:
    import zipfile

    try:
        names = set(zipfile.ZipFile(path).namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightFormatError(f"{path}: not an .npz file ({type(exc).__name__}: {exc})") from exc
    if not {"mean.npy", "tex_dir.npy"} <= names:
        raise WeightFormatError(f"{path}: FLAME_texture.npz holds 'mean' and 'tex_dir'; found "
                                f"{sorted(n.removesuffix('.npy') for n in names)[:8]}")
    with np.load(path) as z:
        mean_shape = z["mean"].shape
    if len(mean_shape) != 3 or mean_shape[0] != mean_shape[1] or mean_shape[2] != 3:
        raise WeightFormatError(f"{path}: 'mean' is {mean_shape}, expected (N, N, 3)")
    n = mean_shape[0]
    idx = _nearest_rows(n, uv_size)
    mean, _ = _read_npz_member_rows(path, "mean", idx, idx, 3)
    basis, shape = _read_npz_member_rows(path, "tex_dir", idx, idx, n_tex)
    if shape[:3] != (n, n, 3) or len(shape) != 4 or shape[3] < n_tex:
        raise WeightFormatError(f"{path}: 'tex_dir' is {shape}, expected ({n}, {n}, 3, K >= {n_tex})")
    # /255 and BGR -> RGB, as DECA's FLAMETex
    return FlameTexture(mean[..., ::-1].copy() / 255.0, basis[:, :, ::-1, :].copy() / 255.0)


class _InertStandIn:
    """Takes the place of torch tensors (and their storages) while unpickling the landmark embedding."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return _InertStandIn()


class _EmbeddingUnpickler(_AllowListUnpickler):
    """numpy arrays as themselves; the dynamic-contour entries (torch tensors) as inert stand-ins."""

    _DICTS = {("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "torch":
            return _InertStandIn
        if (module, name) in self._DICTS:
            return super(_AllowListUnpickler, self).find_class(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return _InertStandIn()


STATIC_LANDMARKS_FROM = 17  # DECA's landmarks2d = 17 dynamic contour points + 51 static (68-point 17..67)


def load_landmark_embedding(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`landmark_embedding.npy` -> static (51,) face indices and (51, 3) barycentrics (68-point ids 17..67).

    The file is a pickled dict inside an object .npy; it is read with an allow-list (no code runs).
    """
    try:
        with open(path, "rb") as fh:
            shape, _, dtype = _npy_header(fh)
            if not dtype.hasobject:
                raise ValueError(f"a {dtype} array, not the pickled dict")
            raw = _EmbeddingUnpickler(fh, encoding="latin1").load()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, TypeError, AttributeError, ImportError) as exc:
        raise WeightFormatError(f"{path}: not DECA's landmark_embedding.npy ({type(exc).__name__}: {exc})") from exc
    emb = raw.item() if isinstance(raw, np.ndarray) and raw.dtype == object else raw
    if not isinstance(emb, dict) or not {"static_lmk_faces_idx", "static_lmk_bary_coords"} <= set(emb):
        have = sorted(emb)[:8] if isinstance(emb, dict) else type(emb).__name__
        raise WeightFormatError(f"{path}: needs static_lmk_faces_idx and static_lmk_bary_coords; found {have}")
    faces = np.asarray(emb["static_lmk_faces_idx"], np.int64).ravel()
    bary = np.asarray(emb["static_lmk_bary_coords"], np.float64).reshape(-1, 3)
    if faces.shape != (51,) or bary.shape != (51, 3):
        raise WeightFormatError(f"{path}: static landmarks are {faces.shape} / {bary.shape}, expected (51,) / (51, 3)")
    return faces, bary


_ASSET_CACHE: dict[tuple[str, str], object] = {}


def cached_asset(kind: str, path: str | Path):
    """One loaded UV template / texture space / landmark embedding per file and process (read-only after)."""
    key = (kind, str(Path(path).expanduser().resolve()))
    loader = {"uv": load_head_template, "texture": load_flame_texture, "landmarks": load_landmark_embedding}[kind]
    with _CACHE_LOCK:
        obj = _ASSET_CACHE.get(key)
        if obj is None:
            obj = _ASSET_CACHE[key] = loader(key[1])
        return obj
