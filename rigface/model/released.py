"""Load the authors' released RigFace UNets (``unet_denoise/``, ``unet_id/``) into a RigFaceModel by a key map.

The released folders hold diffusers-0.22 UNet state dicts in safetensors; ``unet_denoise`` also holds the
expression MLP as ``au_aug_mlp.*``. UNet2DConditionModel key names did not change between 0.22 and today, so the
map is: prefix each UNet key with its part, rename ``au_aug_mlp`` to ``expression_proj``. Every key and shape is
checked; nothing is loaded silently half-way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

RELEASED_PARTS = ("unet_denoise", "unet_id")
# Keys the released code keeps outside the UNet, and where they live in RigFaceModel.
_EXTRA_KEYS = {"au_aug_mlp.": "expression_proj."}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing or unexpected keys, wrong shapes, wrong layout."""


def map_released_key(part: str, key: str) -> str:
    """The RigFaceModel state-dict key for one key of a released ``part`` folder."""
    for old, new in _EXTRA_KEYS.items():
        if key.startswith(old):
            if part != "unet_denoise":
                raise CheckpointError(f"{part}: unexpected key {key!r} (the expression MLP lives in unet_denoise)")
            return new + key[len(old):]
    return f"{part}.{key}"


def read_part(folder: str | Path, part: str) -> dict[str, torch.Tensor]:
    """All tensors of a released part folder (one or several safetensors shards)."""
    root = Path(folder) / part
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors file in {root}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def map_released_state(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part, state in parts.items():
        if part not in RELEASED_PARTS:
            raise CheckpointError(f"unknown released part {part!r}")
        for key, value in state.items():
            out[map_released_key(part, key)] = value
    return out


def load_released_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a mapped released state dict into the model, strictly (rigger weights are not in the release)."""
    own = model.state_dict()
    expected = {k for k in own if not k.startswith("rigger.")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    bad_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(state.keys() & own.keys())
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            "released checkpoint does not fit the model: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(bad_shapes)} shape mismatches {bad_shapes[:5]}"
        )
    model.load_state_dict(dict(state), strict=False)
    log.info("loaded released RigFace weights: %d tensors", len(state))


def load_released(model: torch.nn.Module, folder: str | Path) -> None:
    """Load ``folder/unet_denoise`` and ``folder/unet_id`` (a local folder) into ``model``."""
    if getattr(model, "rigger", None) is not None:
        raise CheckpointError("the released checkpoints use 'concat' conditioning; set model.conditioning=concat")
    parts = {part: read_part(folder, part) for part in RELEASED_PARTS}
    load_released_state(model, map_released_state(parts))
