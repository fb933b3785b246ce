"""Architectures: Stable Diffusion 1.5 sizes, and a tiny model with the same block structure for CPU tests."""

from __future__ import annotations

from typing import Any

SD15_SCALING_FACTOR = 0.18215
CONDITION_CHANNELS = 8  # background latent (4) + render latent (4)

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5 unet/config.json, the fields that define the architecture.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": list(_SD_DOWN),
    "up_block_types": list(_SD_UP),
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

# Same block types and 16 transformer blocks as SD-1.5, widths cut so a 64 px step takes a fraction of a second.
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": SD15_SCALING_FACTOR,
}

# 8x downsampling like SD's VAE (64 px -> 8x8 latents), a few thousand parameters per block.
TINY_VAE: dict[str, Any] = {
    **SD15_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, the noise schedule.
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

UNETS = {"tiny": TINY_UNET, "sd15": SD15_UNET}
VAES = {"tiny": TINY_VAE, "sd15": SD15_VAE}


def unet_configs(base: dict[str, Any], conditioning: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(denoise, identity) UNet configs from one base UNet config.

    The denoising UNet carries the expression as a class embedding of type 'identity' (added to the time
    embedding); with 'concat' conditioning its conv_in takes 4 + 8 channels.
    """
    base = {k: v for k, v in dict(base).items() if not k.startswith("_")}
    identity = {**base, "in_channels": 4}
    denoise = {**base, "class_embed_type": "identity"}
    denoise["in_channels"] = 4 + CONDITION_CHANNELS if conditioning == "concat" else 4
    return denoise, identity
