"""Load the authors' released RigFace UNets (``unet_denoise/``, ``unet_id/``) into a RigFaceModel by a key map.

As published, each part folder holds ``checkpoint-N/`` folders (``unet_denoise/checkpoint-70000/`` ...), each with a
diffusers-0.22 UNet state dict in safetensors; ``unet_denoise`` also holds the expression MLP as ``au_aug_mlp.*``.
A part folder holding its safetensors directly loads too. UNet2DConditionModel key names did not change between 0.22
and today, so the map is: prefix each UNet key with its part, rename ``au_aug_mlp`` to ``expression_proj``. Every
key and shape is checked; nothing is loaded silently half-way.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Mapping

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

RELEASED_PARTS = ("unet_denoise", "unet_id")
# Keys the released code keeps outside the UNet, and where they live in RigFaceModel.
_EXTRA_KEYS = {"au_aug_mlp.": "expression_proj."}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def choose_weights(files: list[str], part: str, checkpoint: str | None = None) -> list[str]:
    """The safetensors files (paths relative to the part folder) to load: those directly in it, or those of its
    newest ``checkpoint-N/`` (or the one named)."""
    paths = [PurePosixPath(f) for f in files if f.endswith(".safetensors")]
    direct = sorted(str(p) for p in paths if len(p.parts) == 1)
    found = {p.parts[0] for p in paths if len(p.parts) == 2 and _CHECKPOINT.match(p.parts[0])}
    if checkpoint is None and direct:
        return direct
    if checkpoint is not None and checkpoint not in found:
        raise CheckpointError(f"{part}: no {checkpoint}/ holding safetensors (found: {', '.join(sorted(found)) or 'none'})")
    if not found:
        raise CheckpointError(f"{part}: no safetensors file in it nor in a checkpoint-N/ folder")
    checkpoint = checkpoint or max(found, key=lambda name: int(_CHECKPOINT.match(name).group(1)))
    log.info("released %s: loading %s", part, checkpoint)
    return sorted(str(p) for p in paths if len(p.parts) == 2 and p.parts[0] == checkpoint)


def read_part(folder: str | Path, part: str, checkpoint: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a released part folder on local disk (one or several safetensors shards)."""
    root = Path(folder) / part
    files = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")] if root.is_dir() else []
    state: dict[str, torch.Tensor] = {}
    for rel in choose_weights(files, part, checkpoint):
        state.update(load_file(str(root / rel)))
    return state


def read_released(uri: str, checkpoint: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Both parts' tensors from a local folder or an s3:// prefix; from S3 only the chosen files are fetched, to a
    temporary folder removed once they are read."""
    if not uri.startswith("s3://"):
        if not Path(uri).is_dir():
            raise CheckpointError(f"released RigFace folder not found: {uri}")
        return {part: read_part(uri, part, checkpoint) for part in RELEASED_PARTS}
    from rigface.data import storage

    parts = {}
    tmp = tempfile.mkdtemp(prefix="rigface-released-")
    try:
        for part in RELEASED_PARTS:
            prefix = storage.join(uri, part) + "/"
            files = [u[len(prefix):] for u in storage.list_urls(prefix)]
            state: dict[str, torch.Tensor] = {}
            for rel in choose_weights(files, part, checkpoint):
                local = Path(tmp, part, *PurePosixPath(rel).parts)
                local.parent.mkdir(parents=True, exist_ok=True)
                storage.download_file(prefix + rel, local)
                state.update(load_file(str(local)))
                local.unlink()  # several GB per part: do not hold two copies on disk
            parts[part] = state
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parts


def is_released_folder(uri: str) -> bool:
    """Whether ``uri`` (local folder or s3:// prefix) is laid out as the authors' release: both part folders, and
    no pipeline index (a saved RigFace model is never mistaken for one)."""
    if not uri.startswith("s3://"):
        root = Path(uri)
        return not (root / "model_index.json").exists() and all((root / p).is_dir() for p in RELEASED_PARTS)
    from rigface.data import storage

    if storage.exists(storage.join(uri, "model_index.json")):
        return False
    return all(storage.list_urls(storage.join(uri, part) + "/", suffix=".safetensors") for part in RELEASED_PARTS)


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


def load_released(model: torch.nn.Module, uri: str | Path, checkpoint: str | None = None) -> None:
    """Load ``uri/unet_denoise`` and ``uri/unet_id`` (local folder or s3:// prefix) into ``model``."""
    if getattr(model, "rigger", None) is not None:
        raise CheckpointError("the released checkpoints use 'concat' conditioning; set model.conditioning=concat")
    load_released_state(model, map_released_state(read_released(str(uri), checkpoint)))
