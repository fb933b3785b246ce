"""One RigFace training step: frozen VAE encodes, DDPM noise, MSE on the noise (or v) prediction."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

BATCH_IMAGES = ("source", "target", "render", "background")


class BatchError(ValueError):
    """A training batch that does not follow the shard format."""


def check_batch(batch: Mapping[str, torch.Tensor], expression_dim: int) -> int:
    """The batch size, after checking keys, shapes and value ranges."""
    missing = [k for k in (*BATCH_IMAGES, "expression") if k not in batch]
    if missing:
        raise BatchError(f"batch lacks {missing}")
    shape = tuple(batch["source"].shape)
    if len(shape) != 4 or shape[1] != 3:
        raise BatchError(f"images must be (B, 3, H, W), source is {shape}")
    for key in BATCH_IMAGES:
        if tuple(batch[key].shape) != shape:
            raise BatchError(f"{key} is {tuple(batch[key].shape)}, source is {shape}")
        if not batch[key].is_floating_point():
            raise BatchError(f"{key} must be float in [-1, 1], got {batch[key].dtype}")
    exp = batch["expression"]
    if tuple(exp.shape) != (shape[0], expression_dim):
        raise BatchError(f"expression must be ({shape[0]}, {expression_dim}), got {tuple(exp.shape)}")
    return shape[0]


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

    # One VAE pass for all four images (no gradients: the VAE is frozen).
    images = torch.cat([batch[k] for k in ("target", "source", "background", "render")], dim=0)
    with torch.no_grad():
        dist = vae.encode(images.to(device=device, dtype=vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        eps = randn_tensor(mean[:bsz].shape, generator=generator, device=device, dtype=torch.float32)
        latents = (mean[:bsz] + std[:bsz] * eps) * vae.config.scaling_factor
        source, background, render = mean[bsz:].split(bsz)  # the mode of a Gaussian is its mean

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
