"""DECA (Feng et al. 2021) coarse encoder + FLAME: codes from a 224 face crop, posed vertices, re-posing.

`deca_model.tar` is a torch-saved dict with 'E_flame' (ResNet-50 trunk `encoder.*` + MLP `layers.0/2.*`
giving shape 100, tex 50, exp 50, pose 6, cam 3, light 27), 'E_detail' and 'D_detail' (unused here).
Input: RGB in [0, 1] at 224 (DECA crops the FAN box scaled by 1.3). Camera: orthographic, pixel =
(s * (X + t) + 1) * size / 2 with y flipped, in the crop the codes were regressed from.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigface.face.backends.flame import cached_flame
from rigface.face.backends.nets import resnet50
from rigface.face.backends.weights import WeightFormatError, load_exact, load_torch_checkpoint, strip_prefix

CODE_SPLITS = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
NUM_CODES = sum(CODE_SPLITS.values())  # 236
INPUT_SIZE = 224


class DecaEncoder(nn.Module):
    """DECA's ResnetEncoder: ResNet-50 features -> Linear(2048, 1024) -> ReLU -> Linear(1024, 236)."""

    def __init__(self, outsize: int = NUM_CODES):
        super().__init__()
        self.encoder = resnet50(num_classes=None)
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, outsize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(x))


def load_deca_encoder(path: str | Path) -> DecaEncoder:
    obj = load_torch_checkpoint(Path(path))
    if not isinstance(obj, dict) or "E_flame" not in obj:
        have = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise WeightFormatError(f"{path}: a deca_model.tar holds 'E_flame' (and E_detail, D_detail); found {have}")
    enc = DecaEncoder()
    load_exact(enc, strip_prefix(obj["E_flame"], "module."), f"{path}[E_flame]")
    return enc.eval()


def split_codes(codes: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if c.shape[-1] != NUM_CODES:
        raise ValueError(f"expected {NUM_CODES} DECA codes, got {c.shape[-1]}")
    out, i = {}, 0
    for name, n in CODE_SPLITS.items():
        out[name] = c[..., i : i + n].astype(np.float32)
        i += n
    out["light"] = out["light"].reshape(*c.shape[:-1], 9, 3)
    return out


def orthographic_pixels(vertices: np.ndarray, cam: np.ndarray, size: int) -> np.ndarray:
    """DECA's batch_orth_proj into a size x size crop: (N, 3) x, y pixels (y down) and z (smaller = nearer)."""
    v = np.asarray(vertices, np.float64)
    s, tx, ty = (float(c) for c in cam)
    x = s * (v[:, 0] + tx)
    y = -s * (v[:, 1] + ty)
    z = -s * v[:, 2]
    return np.stack([(x + 1) * size / 2, (y + 1) * size / 2, z * size / 2], 1).astype(np.float32)


class Deca:
    """`Deca(checkpoint, flame_pkl, texture, uv, landmarks)`: `encode(rgb224) -> codes`, `vertices(codes)`.

    texture: `FLAME_texture.npz`; uv: `head_template.obj`; landmarks: `landmark_embedding.npy` (DECA's data
    folder). They are loaded (and checked) here, and named in every fit so the renders can load them too.
    """

    name = "deca"

    def __init__(self, checkpoint: str | Path, flame_model: str | Path, texture: str | Path, uv: str | Path,
                 landmarks: str | Path, device: str = "cpu"):
        from rigface.face.backends.flame import cached_asset

        def resolved(p):
            return str(Path(p).expanduser().resolve())

        self.flame_path = resolved(flame_model)
        self.flame = cached_flame(self.flame_path)  # CPU: the re-posed renders share it (5023 vertices, cheap)
        self.assets = {"flame": self.flame_path, "texture": resolved(texture), "uv": resolved(uv),
                       "landmarks": resolved(landmarks)}
        self.uv = cached_asset("uv", self.assets["uv"])
        if self.uv.n_vertices != self.flame.v_template.shape[0]:
            raise WeightFormatError(f"{uv}: {self.uv.n_vertices} vertices, but the FLAME model has "
                                    f"{self.flame.v_template.shape[0]}")
        self.texture = cached_asset("texture", self.assets["texture"])
        faces, _ = cached_asset("landmarks", self.assets["landmarks"])
        if faces.max() >= len(self.uv.faces):
            raise WeightFormatError(f"{landmarks}: landmark face {faces.max()} >= {len(self.uv.faces)} FLAME faces")
        self.encoder = load_deca_encoder(checkpoint).to(device)
        self.device = device
        self.version = Path(checkpoint).name
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode(self, rgb224: np.ndarray) -> dict[str, np.ndarray]:
        if rgb224.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"DECA takes a {INPUT_SIZE}x{INPUT_SIZE} crop, got {rgb224.shape[:2]}")
        x = torch.from_numpy(np.ascontiguousarray(rgb224[..., :3])).float().div(255.0).permute(2, 0, 1)[None]
        with self._lock:
            out = self.encoder(x.to(self.device))
        return {k: v[0] for k, v in split_codes(out).items()}

    @torch.no_grad()
    def vertices(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        def t(name):
            return torch.as_tensor(codes[name], dtype=torch.float32)[None]

        return self.flame(t("shape"), t("exp"), t("pose"))[0].cpu().numpy()
