"""Build RigFace components from a ModelConfig: random presets, Stable Diffusion 1.5 init, released weights."""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from rigface.model.config import ModelConfig
from rigface.model.presets import SD15_SCHEDULER, UNETS, VAES, unet_configs
from rigface.model.released import load_released
from rigface.model.rigface_model import RigFaceModel

log = logging.getLogger(__name__)

TEXT_TOKENS = 77


@dataclass
class RigFaceComponents:
    """What training and editing need: the trainable model and its frozen companions."""

    model: RigFaceModel
    vae: AutoencoderKL  # frozen
    text_embedding: torch.Tensor  # (1, 77, cross_attention_dim), the fixed prompt, computed once
    noise_scheduler: DDPMScheduler
    config: ModelConfig = field(default_factory=ModelConfig)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RigFaceComponents":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.model.to(**kwargs)
        self.vae.to(**kwargs)
        self.text_embedding = self.text_embedding.to(**kwargs)
        return self


def build_rigface(cfg: ModelConfig, seed: int = 0) -> RigFaceComponents:
    """Components for ``cfg``.

    With ``cfg.pretrained`` the architecture comes from that SD-1.5 folder (both UNets from its UNet, the
    denoising conv_in widened with zero-initialized channels, expression projection and rigger output zero so
    the start equals SD); otherwise ``cfg.preset`` picks random weights (seeded). ``cfg.released`` then loads the
    authors' unet_denoise/unet_id on top.
    """
    if cfg.pretrained:
        components = _from_stable_diffusion(cfg)
    else:
        components = _random(cfg, seed)
    if cfg.released:
        load_released(components.model, cfg.released, cfg.released_checkpoint)
    components.model.train()
    return components


# ---------------------------------------------------------------------- random presets


def _random(cfg: ModelConfig, seed: int) -> RigFaceComponents:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoise, identity = unet_configs(UNETS[cfg.preset], cfg.conditioning)
        model = RigFaceModel(denoise, identity, cfg.expression_dim, cfg.conditioning)
    vae = _random_vae(cfg, seed)
    # No CLIP vocabulary exists offline: a seeded stand-in of the real shape, fixed for the life of the model.
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(1, TEXT_TOKENS, denoise["cross_attention_dim"], generator=gen)
    return RigFaceComponents(model, _frozen(vae), text, _noise_scheduler(SD15_SCHEDULER, cfg), cfg)


def _random_vae(cfg: ModelConfig, seed: int) -> AutoencoderKL:
    # Seeded on its own, so build_vae gives the same VAE as build_rigface without building the UNets.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKL.from_config(VAES[cfg.preset])


def build_vae(cfg: ModelConfig, seed: int = 0) -> AutoencoderKL:
    """The frozen VAE that ``build_rigface(cfg, seed)`` would hold, alone (for `rigface latents`)."""
    if cfg.pretrained:
        with local_folder(cfg.pretrained, subfolders=("vae",)) as root:
            return _frozen(AutoencoderKL.from_pretrained(root, subfolder="vae"))
    return _frozen(_random_vae(cfg, seed))


def _noise_scheduler(base: dict, cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config({**base, "prediction_type": cfg.prediction_type})


def _frozen(vae: AutoencoderKL) -> AutoencoderKL:
    vae.requires_grad_(False)
    return vae.eval()


# ---------------------------------------------------------------------- Stable Diffusion 1.5


def _from_stable_diffusion(cfg: ModelConfig) -> RigFaceComponents:
    with local_folder(cfg.pretrained, subfolders=("unet", "vae", "scheduler", "tokenizer", "text_encoder")) as root:
        sd_unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        denoise, identity = unet_configs(dict(sd_unet.config), cfg.conditioning)
        model = RigFaceModel(denoise, identity, cfg.expression_dim, cfg.conditioning)
        init_from_sd_unet(model, sd_unet.state_dict())
        del sd_unet
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", prediction_type=cfg.prediction_type)
        text = encode_prompt(root, cfg.prompt)
    log.info("initialized RigFace from Stable Diffusion at %s", cfg.pretrained)
    return RigFaceComponents(model, _frozen(vae), text, scheduler, cfg)


@torch.no_grad()
def init_from_sd_unet(model: RigFaceModel, sd_state: dict[str, torch.Tensor]) -> None:
    """Both UNets from one SD UNet state dict; new inputs start at zero so the model starts as SD."""
    model.unet_id.load_state_dict(sd_state, strict=True)
    denoise_state = dict(sd_state)
    w = sd_state["conv_in.weight"]
    in_channels = model.unet_denoise.conv_in.in_channels
    if in_channels != w.shape[1]:
        widened = torch.zeros(w.shape[0], in_channels, *w.shape[2:], dtype=w.dtype)
        widened[:, : w.shape[1]] = w
        denoise_state["conv_in.weight"] = widened
    model.unet_denoise.load_state_dict(denoise_state, strict=True)
    model.expression_proj.weight.zero_()
    model.expression_proj.bias.zero_()
    if model.rigger is not None:
        model.rigger.proj.weight.zero_()
        model.rigger.proj.bias.zero_()


@torch.no_grad()
def encode_prompt(root: str, prompt: str) -> torch.Tensor:
    """CLIP text embedding (1, 77, dim) of the fixed prompt, from the folder's tokenizer and text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids)[0].float().contiguous()


# ---------------------------------------------------------------------- where weights live


@contextmanager
def local_folder(uri: str, subfolders: tuple[str, ...] | None = None) -> Iterator[str]:
    """A local folder for a local path, an s3:// URI (downloaded to a temp folder, removed on exit: SD-1.5 is
    several GB per worker) or a hub id (yielded as is; diffusers resolves it when the machine can reach a hub)."""
    if uri.startswith("s3://"):
        tmp = download_folder(uri, subfolders)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if Path(uri).exists():
        yield uri
        return
    if uri.count("/") == 1 and not uri.startswith((".", "/")):
        yield uri  # hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'
        return
    raise FileNotFoundError(f"model folder not found: {uri}")


def download_folder(uri: str, subfolders: tuple[str, ...] | None = None, dst: str | None = None) -> str:
    """Copy every object under an s3:// prefix to a local folder; keys that would escape it are refused."""
    from rigface.data import storage

    prefix = uri.rstrip("/") + "/"
    dst_root = Path(dst or tempfile.mkdtemp(prefix="rigface-weights-")).resolve()
    urls = storage.list_urls(prefix)
    if not urls:
        raise FileNotFoundError(f"nothing stored under {uri}")
    for url in urls:
        rel = PurePosixPath(url[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"refusing object key outside {uri}: {url}")
        if subfolders is not None and len(rel.parts) > 1 and rel.parts[0] not in subfolders:
            continue
        target = dst_root.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(url, target)
    log.info("downloaded %s to %s", uri, dst_root)
    return str(dst_root)
