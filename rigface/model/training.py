"""One RigFace training step: frozen VAE encodes (or cached latents), DDPM noise, MSE on the noise (or v) prediction."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

BATCH_IMAGES = ("source", "target", "render", "background")
# Precomputed latents (`rigface latents`): the same quantities the VAE pass below computes, per sample.
LATENT_PREFIX = "latent_"
BATCH_LATENTS = tuple(LATENT_PREFIX + k for k in ("source", "background", "render", "target_mean", "target_std"))


class BatchError(ValueError):
    """A training batch that does not follow the shard format."""


def has_cached_latents(batch: Mapping[str, torch.Tensor]) -> bool:
    return all(k in batch for k in BATCH_LATENTS)


def check_batch(batch: Mapping[str, torch.Tensor], expression_dim: int) -> int:
    """The batch size, after checking keys, shapes and value ranges (images, or cached latents)."""
    cached = has_cached_latents(batch)
    keys = BATCH_LATENTS if cached else BATCH_IMAGES
    missing = [k for k in (*keys, "expression") if k not in batch]
    if missing:
        raise BatchError(f"batch lacks {missing}")
    first = keys[0]
    shape = tuple(batch[first].shape)
    if len(shape) != 4 or (not cached and shape[1] != 3):
        raise BatchError(f"{'latents' if cached else 'images'} must be (B, C, H, W), {first} is {shape}")
    for key in keys:
        if tuple(batch[key].shape) != shape:
            raise BatchError(f"{key} is {tuple(batch[key].shape)}, {first} is {shape}")
        if not batch[key].is_floating_point():
            raise BatchError(f"{key} must be float, got {batch[key].dtype}")
    exp = batch["expression"]
    if tuple(exp.shape) != (shape[0], expression_dim):
        raise BatchError(f"expression must be ({shape[0]}, {expression_dim}), got {tuple(exp.shape)}")
    return shape[0]


@torch.no_grad()
def posterior_latents(vae, batch: Mapping[str, torch.Tensor], bsz: int) -> tuple[torch.Tensor, ...]:
    """(target mean, target std, source, background, render) latents in float32 on the VAE's device: read from
    the batch when it carries cached latents, else one VAE pass over all four images (the VAE is frozen)."""
    device = vae.device
    if has_cached_latents(batch):
        return tuple(batch[k].to(device=device, dtype=torch.float32) for k in BATCH_LATENTS[3:] + BATCH_LATENTS[:3])
    images = torch.cat([batch[k] for k in ("target", "source", "background", "render")], dim=0)
    dist = vae.encode(images.to(device=device, dtype=vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    source, background, render = mean[bsz:].split(bsz)  # the mode of a Gaussian is its mean
    return mean[:bsz], std[:bsz], source, background, render


@torch.no_grad()
def cacheable_latents(vae, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `rigface latents` stores per sample: ``BATCH_LATENTS`` name (without the prefix) -> (B, 4, h, w)
    float32 on the CPU, from one VAE pass over a batch of images."""
    bsz = batch["source"].shape[0]
    target_mean, target_std, source, background, render = posterior_latents(vae, batch, bsz)
    out = {"source": source, "background": background, "render": render,
           "target_mean": target_mean, "target_std": target_std}
    return {k: v.cpu() for k, v in out.items()}


def training_step(components, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                  model: torch.nn.Module | None = None) -> torch.Tensor:
    """Scalar MSE loss for one batch.

    ``model`` defaults to ``components.model``; pass the DDP-wrapped model to train under DDP (only its forward
    is called). Works under ``torch.autocast``; the loss is computed in float32. Target latents are sampled
    and scaled by the VAE scaling factor; source and condition latents are the unscaled mode, as released.
    """
    vae = components.vae
    scheduler = components.noise_scheduler
    model = model if model is not None else components.model
    bsz = check_batch(batch, components.model.config.expression_dim)
    device = vae.device

    with torch.no_grad():
        target_mean, target_std, source, background, render = posterior_latents(vae, batch, bsz)
        eps = randn_tensor(target_mean.shape, generator=generator, device=device, dtype=torch.float32)
        latents = (target_mean + target_std * eps) * vae.config.scaling_factor

    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,),
                              generator=generator, device=generator.device if generator is not None else "cpu")
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")

    text = components.text_embedding.to(device)
    cond = torch.cat([background, render], dim=1)
    expression = batch["expression"].to(device=device, dtype=torch.float32)
    pred = model(noisy, timesteps, source, cond, expression, text)
    return F.mse_loss(pred.float(), target, reduction="mean")
