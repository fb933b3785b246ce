"""A trained RigFace model on storage: the RigFacePipeline's own diffusers folder, on a local path or s3://, or
an MLflow model URI. Downloaded copies are removed once the weights are in memory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from rigface.model.build import RigFaceComponents, build_rigface, download_folder
from rigface.model.config import ModelConfig
from rigface.model.pipeline import RigFacePipeline
from rigface.model.released import CheckpointError, is_released_folder

log = logging.getLogger(__name__)

INDEX = "model_index.json"  # diffusers' pipeline index: written by save_pretrained, required by from_pretrained
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def save_rigface(model: RigFaceComponents | RigFacePipeline, path: str) -> str:
    """Write the model folder to a local path or an s3:// prefix. Components get the authors' sampler.

    Staged in a temporary folder first: a reader never sees a half-written model (locally the finished folder is
    renamed into place; on S3 the index goes up last, and a folder without it does not load).
    """
    pipe = model if isinstance(model, RigFacePipeline) else RigFacePipeline.from_components(model)
    if path.startswith("s3://"):
        from rigface.data import storage

        with tempfile.TemporaryDirectory(prefix="rigface-save-") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            for f in sorted(Path(tmp).rglob("*"), key=lambda p: (p.name == INDEX, str(p))):
                if f.is_file():
                    storage.upload_file(f, storage.join(path, f.relative_to(tmp).as_posix()))
        return path
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_rigface(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 scheduler: str | None = None, model_cfg: ModelConfig | None = None) -> RigFacePipeline:
    """The RigFacePipeline saved at ``uri``: a local folder, an s3:// prefix, or an MLflow URI (``models:/name/1``,
    ``runs:/ID/model``). Loads in the saved dtype (fp32) unless ``dtype`` is given, with the saved scheduler unless
    ``scheduler`` names another diffusers scheduler class (built from the saved scheduler's config).

    ``uri`` may also be the authors' release (``unet_denoise/`` + ``unet_id/``, local or s3://): it holds only the
    two UNets, so it is built on ``model_cfg`` (its ``pretrained`` SD-1.5 folder, ``expression_dim`` ...) with the
    authors' sampler, as ``model.released`` would for training."""
    if not uri.startswith(MLFLOW_SCHEMES) and is_released_folder(uri):
        pipe = _released_pipeline(uri, model_cfg)
    else:
        with model_folder(uri) as local:
            if not (Path(local) / INDEX).is_file():
                raise CheckpointError(f"{uri} is not a RigFace model folder (no {INDEX}) nor the authors' release "
                                      "(unet_denoise/ + unet_id/)")
            try:
                pipe = RigFacePipeline.from_pretrained(local, torch_dtype=dtype)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{uri}: not a loadable RigFace model: {exc}") from exc
    pipe.vae.requires_grad_(False)
    pipe.model.eval()
    pipe.vae.eval()
    if scheduler:
        import diffusers
        from diffusers.schedulers.scheduling_utils import SchedulerMixin

        cls = getattr(diffusers, scheduler, None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise CheckpointError(f"{scheduler!r} is not a diffusers scheduler class")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.to(device) if dtype is None else pipe.to(device, dtype)


def _released_pipeline(uri: str, model_cfg: ModelConfig | None) -> RigFacePipeline:
    if model_cfg is None or not model_cfg.pretrained:
        raise CheckpointError(
            f"{uri} is the authors' release (unet_denoise/ + unet_id/): it needs model.pretrained (the Stable "
            "Diffusion 1.5 folder) for the VAE, the text encoder and the UNet shapes")
    cfg = ModelConfig.model_validate({**model_cfg.model_dump(), "released": uri})
    return RigFacePipeline.from_components(build_rigface(cfg))


@contextmanager
def model_folder(uri: str) -> Iterator[str]:
    """A local folder holding the saved model; a downloaded copy (S3, MLflow) is deleted on exit."""
    if not uri.startswith(("s3://", *MLFLOW_SCHEMES)):
        if not Path(uri).exists():
            raise CheckpointError(f"model folder not found: {uri}")
        yield uri
        return
    tmp = tempfile.mkdtemp(prefix="rigface-model-")
    try:
        if uri.startswith("s3://"):
            yield download_folder(uri, dst=tmp)
        else:
            import mlflow

            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            yield _model_root(Path(local))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_root(path: Path) -> str:
    """The folder that holds the index (an MLflow artifact may wrap the model in one more folder)."""
    if (path / INDEX).exists():
        return str(path)
    subdirs = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    return _model_root(subdirs[0]) if len(subdirs) == 1 else str(path)
