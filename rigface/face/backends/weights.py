"""Finding and checking user-supplied weight files (local path or s3:// URI), before any model work starts.

File names in `FaceConfig` are taken relative to `FaceConfig.weights` (a folder or an s3:// prefix) unless
they are absolute paths or URIs themselves. S3 files are downloaded once into a local cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from rigface.face.assets import FaceModelMissing
from rigface.face.config import FaceConfig
from rigface.face.types import BackendUnavailable

log = logging.getLogger(__name__)


class WeightFileMissing(FaceModelMissing, BackendUnavailable):
    """A user-supplied weight or face-model file named in config is not there (so the backend is unavailable)."""


class WeightFormatError(ValueError):
    """A weight file is there but its keys, shapes or container do not match the published format."""


def _is_uri(ref: str) -> bool:
    return "://" in ref


def weight_ref(cfg: FaceConfig, name: str) -> str:
    """The full path/URI of a configured file: absolute paths and URIs as given, else under cfg.weights."""
    if _is_uri(name) or os.path.isabs(name):
        return name
    if cfg.weights is None:
        raise WeightFileMissing(
            f"{name!r} is a relative name but face.weights (the folder or s3:// prefix holding it) is not set"
        )
    if _is_uri(cfg.weights):
        return cfg.weights.rstrip("/") + "/" + name
    return str(Path(cfg.weights).expanduser() / name)


def exists(ref: str) -> bool:
    if _is_uri(ref):
        from rigface.data import storage

        return storage.exists(ref)
    return Path(ref).exists()


def require(cfg: FaceConfig, name: str, what: str) -> str:
    """The ref of `name`, or WeightFileMissing naming the file and what it is for."""
    ref = weight_ref(cfg, name)
    if not exists(ref):
        raise WeightFileMissing(f"{what}: file not found: {ref} (set face.weights or give an absolute path/URI)")
    return ref


def local_path(ref: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file for `ref`: itself if local, else a cached download (kept between runs)."""
    if not _is_uri(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise WeightFileMissing(f"file not found: {path}")
        return path
    from rigface.data import storage

    cache = Path(cache_dir or os.environ.get("RIGFACE_WEIGHTS_CACHE", Path.home() / ".cache" / "rigface" / "weights"))
    key = hashlib.sha256(ref.encode()).hexdigest()[:16]
    target = cache / key / ref.rstrip("/").rsplit("/", 1)[-1]
    if not target.exists():
        if not storage.exists(ref):
            raise WeightFileMissing(f"file not found: {ref}")
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", ref, target)
        storage.download_file(ref, str(target))
    return target


def load_torch_checkpoint(path: Path) -> Any:
    """torch.load with weights_only=True (tensors, dicts, numbers only): never runs code from the file."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holds non-tensor objects
        raise WeightFormatError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def load_exact(module, state: Mapping[str, Any], source: str) -> None:
    """load_state_dict that names every missing, unexpected or wrong-shaped key in one clear error.

    BatchNorm's `num_batches_tracked` is optional (old checkpoints lack it).
    """
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        def _few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_few(wrong)}")
        raise WeightFormatError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)
