"""A trained RigFace model folder: everything the editor needs, nothing it must fetch elsewhere.

Layout (local folder or s3:// prefix)::

    rigface.json                     format version, the ModelConfig used, file list
    model/config.json                RigFaceModel config (both UNet configs, expression_dim, conditioning)
    model/diffusion_pytorch_model.safetensors
    vae/config.json, vae/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json  the training noise schedule (the pipeline derives UniPC from it)
    text_embedding.safetensors       the cached prompt embedding, key 'text_embedding' (1, 77, dim)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file, save_file

from rigface.model.build import RigFaceComponents, download_folder
from rigface.model.config import ModelConfig
from rigface.model.released import CheckpointError
from rigface.model.rigface_model import RigFaceModel

log = logging.getLogger(__name__)

FORMAT = "rigface-model"
FORMAT_VERSION = 1
MANIFEST = "rigface.json"


def save_rigface(components: RigFaceComponents, path: str) -> str:
    """Write the model folder to a local path or an s3:// prefix (staged locally, then uploaded)."""
    if path.startswith("s3://"):
        from rigface.data import storage

        with tempfile.TemporaryDirectory(prefix="rigface-save-") as tmp:
            _save_local(components, Path(tmp))
            # The manifest goes up last: a reader that finds it finds every file it lists.
            for f in sorted(Path(tmp).rglob("*"), key=lambda p: (p.name == MANIFEST, str(p))):
                if f.is_file():
                    storage.upload_file(f, storage.join(path, f.relative_to(tmp).as_posix()))
        return path
    _save_local(components, Path(path))
    return path


def _save_local(components: RigFaceComponents, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    components.model.save_pretrained(root / "model", safe_serialization=True)
    components.vae.save_pretrained(root / "vae", safe_serialization=True)
    components.noise_scheduler.save_pretrained(root / "scheduler")
    emb = components.text_embedding.detach().to("cpu", torch.float32).contiguous()
    save_file({"text_embedding": emb}, str(root / "text_embedding.safetensors"))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": components.config.model_dump(mode="json"),
        "files": sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()),
    }
    # The manifest goes last: a folder without it is an unfinished save.
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / MANIFEST)


def load_rigface(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> RigFaceComponents:
    """Load a model folder written by ``save_rigface`` (local path or s3:// URI)."""
    tmp = None
    if path.startswith("s3://"):
        tmp = download_folder(path)
        root = Path(tmp)
    else:
        root = Path(path)
    try:
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{path} is not a RigFace model folder (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported format {manifest.get('format')!r} "
                                  f"v{manifest.get('format_version')}")
        cfg = ModelConfig.model_validate(manifest["config"])
        model = RigFaceModel.from_pretrained(root / "model", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
        vae.requires_grad_(False).eval()
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        text = load_file(str(root / "text_embedding.safetensors"))["text_embedding"]
        model.eval()
        components = RigFaceComponents(model, vae, text, scheduler, cfg)
        return components.to(device=device, dtype=dtype)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
