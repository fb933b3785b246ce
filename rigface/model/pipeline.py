"""RigFacePipeline: source + background + render + expression -> edited portrait.

A saved model is this pipeline's own diffusers folder (``save_pretrained`` / ``from_pretrained``)::

    model_index.json     the pipeline: its class, its components, its resolution
    model/               RigFaceModel (both UNets, expression projection): config.json + safetensors
    vae/                 AutoencoderKL
    scheduler/           the sampler, by default the authors' UniPC schedule (see ``authors_sampler``)
    text_embedding/      PromptEmbedding: the fixed prompt's CLIP embedding (1, 77, dim) and the prompt
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UniPCMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rigface.model.build import TEXT_TOKENS
from rigface.model.rigface_model import RigFaceModel


class PromptEmbedding(ModelMixin, ConfigMixin):
    """The fixed prompt's text-encoder output, computed once: a pipeline component, so it saves and loads with the
    pipeline in diffusers' own format (CLIP itself is needed only to build a model, never to run one)."""

    @register_to_config
    def __init__(self, dim: int = 768, tokens: int = TEXT_TOKENS, prompt: str = ""):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(1, tokens, dim), requires_grad=False)

    @classmethod
    def from_tensor(cls, embedding: torch.Tensor, prompt: str = "") -> "PromptEmbedding":
        if embedding.ndim != 3 or embedding.shape[0] != 1:
            raise ValueError(f"text embedding must be (1, tokens, dim), got {tuple(embedding.shape)}")
        module = cls(dim=embedding.shape[2], tokens=embedding.shape[1], prompt=prompt)
        with torch.no_grad():
            module.embedding.copy_(embedding.detach().float())
        return module


def authors_sampler(noise_config: Mapping[str, Any]) -> UniPCMultistepScheduler:
    """UniPC on the model's noise schedule, as the authors sampled: their code built UniPC from SD-1.5's scheduler
    config under diffusers 0.22, i.e. linspace spacing (999, 979, ..., 20 for 50 steps) ending at sigma(t=0)
    (~0.0292). Current diffusers needs both settings spelled out: a DDPM config saved today says 'leading'
    (951, 932, ...) and UniPC now ends at sigma 0 by default."""
    return UniPCMultistepScheduler.from_config(dict(noise_config), timestep_spacing="linspace",
                                               final_sigmas_type="sigma_min")


class RigFacePipeline(DiffusionPipeline):
    """Edit portraits with a RigFace model.

    The Identity Encoder runs once per image; each step is one Denoising UNet evaluation on the plain batch (the
    released code's guidance duplicated the batch with identical halves: a no-op at twice the cost, left out).
    The scheduler is whatever the pipeline holds: the authors' UniPC for a fresh model (``from_components``),
    the saved one for a loaded model; swap it as in any diffusers pipeline
    (``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``).
    """

    model_cpu_offload_seq = "model->vae"

    def __init__(self, model: RigFaceModel, vae: AutoencoderKL, scheduler: SchedulerMixin,
                 text_embedding: PromptEmbedding, resolution: int | None = None):
        super().__init__()
        if not isinstance(text_embedding, PromptEmbedding):
            raise TypeError("text_embedding must be a PromptEmbedding (PromptEmbedding.from_tensor(t, prompt))")
        self.register_modules(model=model, vae=vae, scheduler=scheduler, text_embedding=text_embedding)
        self.register_to_config(resolution=resolution)
        self.set_progress_bar_config(disable=True)  # quiet by default; callers may turn it back on

    @property
    def resolution(self) -> int | None:
        return self.config.resolution

    @classmethod
    def from_components(cls, components, scheduler: SchedulerMixin | None = None) -> "RigFacePipeline":
        """A pipeline over built RigFaceComponents; the authors' UniPC on their noise schedule unless given."""
        if scheduler is None:
            scheduler = authors_sampler(components.noise_scheduler.config)
        text = PromptEmbedding.from_tensor(components.text_embedding, components.config.prompt)
        text.to(device=components.text_embedding.device)
        return cls(components.model, components.vae, scheduler, text, resolution=components.config.resolution)

    def optimize_for_speed(self, channels_last: bool = True, compile: bool | str = False) -> "RigFacePipeline":
        """Channels-last weights (the layout tensor-core convolutions run in) and, optionally, ``torch.compile``
        of the Denoising UNet, the module the N steps run (compiled in place: state-dict keys do not change).
        ``compile`` is False, True (torch's default mode) or a torch.compile mode; "reduce-overhead" replays
        CUDA graphs, which is what a batch-1 edit needs: it is bound by kernel launches, not by FLOPs.
        Attention is already scaled-dot-product everywhere (FaceFusion's processor and diffusers' default)."""
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            mode = None if compile is True else compile
            self.model.unet_denoise.compile(fullgraph=False, dynamic=False, mode=mode)
        return self

    # ------------------------------------------------------------------ inputs

    def _to_tensor(self, images, name: str, size: int | None) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] from PIL images, uint8 arrays (H, W, 3) / (B, H, W, 3), or tensors
        already in [-1, 1] (B, 3, H, W)."""
        if isinstance(images, torch.Tensor):
            t = images if images.ndim == 4 else images[None]
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"{name}: tensor must be (B, 3, H, W), got {tuple(images.shape)}")
            t = t.float()
        else:
            if isinstance(images, np.ndarray) and images.ndim == 4:
                images = list(images)
            elif not isinstance(images, (list, tuple)):
                images = [images]
            arrays = []
            for im in images:
                a = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
                if a.ndim == 2:
                    a = np.stack([a] * 3, -1)
                if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
                    raise ValueError(f"{name}: expected uint8 RGB images (H, W, 3), got {a.dtype} {a.shape}")
                arrays.append(a)
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"{name}: images in one batch must share a size")
            t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if size is not None and tuple(t.shape[-2:]) != (size, size):
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
            t = t.clamp(-1.0, 1.0)
        return t

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # Unscaled mode, as the released model uses for source and conditions.
        vae = self.vae
        return vae.encode(images.to(device=self._execution_device, dtype=vae.dtype)).latent_dist.mode()

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        source,
        background,
        render,
        expression,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        device = self._execution_device
        model, vae = self.model, self.vae
        dtype = model.dtype
        size = self.resolution
        src = self._to_tensor(source, "source", size)
        size = size or src.shape[-1]
        bg = self._to_tensor(background, "background", size)
        rd = self._to_tensor(render, "render", size)
        batch = src.shape[0]
        if bg.shape[0] != batch or rd.shape[0] != batch:
            raise ValueError(f"batch sizes differ: source {batch}, background {bg.shape[0]}, render {rd.shape[0]}")
        exp = torch.as_tensor(np.asarray(expression, dtype=np.float32) if not isinstance(expression, torch.Tensor)
                              else expression).float()
        exp = exp[None] if exp.ndim == 1 else exp
        if tuple(exp.shape) != (batch, model.config.expression_dim):
            raise ValueError(f"expression must be ({batch}, {model.config.expression_dim}), got {tuple(exp.shape)}")

        latents_all = self._encode(torch.cat([src, bg, rd], 0)).to(dtype)
        source_lat, bg_lat, rd_lat = latents_all.split(batch)
        cond = torch.cat([bg_lat, rd_lat], dim=1)
        text = self.text_embedding.embedding.to(device=device, dtype=dtype)
        exp = exp.to(device=device, dtype=dtype)
        identity = model.encode_identity(source_lat, text)  # once per image, reused at every step

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, model.unet_denoise.config.out_channels, *source_lat.shape[-2:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(latents, t).to(dtype)
            timestep = t.expand(batch) if t.ndim == 0 else t
            pred = model.denoise(model_in, timestep, identity, cond, exp, text)
            latents = self.scheduler.step(pred.float(), t, latents).prev_sample

        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = image.cpu()
        else:
            out = image.permute(0, 2, 3, 1).cpu().numpy()
            out = (out * 255.0).round().astype(np.uint8)
            if output_type == "pil":
                from PIL import Image

                out = [Image.fromarray(a) for a in out]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)
