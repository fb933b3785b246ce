"""RigFaceModel: Identity Encoder + Denoising UNet (stock diffusers UNets), expression projection, conditioning."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from rigface.model.facefusion import (
    IDENTITY_KWARG,
    IdentityCapture,
    install_facefusion,
    transformer_blocks,
    unused_identity_parameters,
)
from rigface.model.presets import CONDITION_CHANNELS

IdentityTokens = Mapping[str, torch.Tensor]


class AttributeRigger(nn.Module):
    """The paper's Attribute Rigger: Conv2d over the 8 condition-latent channels, 4x4 kernel, stride 2.

    Its half-resolution output is projected (1x1) to the width of the UNet's second down block and added there as
    an intra-block residual (diffusers' T2I-Adapter input), the first place where the UNet runs at that resolution.
    """

    def __init__(self, out_channels: int, channels: int = CONDITION_CHANNELS):
        super().__init__()
        self.conv = nn.Conv2d(CONDITION_CHANNELS, channels, kernel_size=4, stride=2, padding=1)
        self.act = nn.SiLU()
        self.proj = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, cond_latents: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.conv(cond_latents)))


class RigFaceModel(ModelMixin, ConfigMixin):
    """The trainable part of RigFace.

    ``forward(noisy_latents, timesteps, source_latents, cond_latents, expression, text_embedding)`` runs the
    Identity Encoder once (timestep 0) and the Denoising UNet with FaceFusion, and returns the noise (or v)
    prediction. The pipeline calls ``encode_identity`` once per image and ``denoise`` per step.
    ``cond_latents`` is background and render latents concatenated on channels (B, 8, h, w).
    """

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        unet_denoise_config: dict[str, Any],
        unet_id_config: dict[str, Any],
        expression_dim: int = 52,
        conditioning: str = "concat",
    ):
        super().__init__()
        if conditioning not in ("concat", "rigger"):
            raise ValueError(f"conditioning must be 'concat' or 'rigger', got {conditioning!r}")
        self.unet_denoise = UNet2DConditionModel.from_config(unet_denoise_config)
        self.unet_id = UNet2DConditionModel.from_config(unet_id_config)
        time_dim = self.unet_denoise.time_embedding.linear_2.out_features
        self.expression_proj = nn.Linear(expression_dim, time_dim)  # the released 'au_aug_mlp'
        self.rigger = (
            AttributeRigger(self.unet_denoise.config.block_out_channels[1]) if conditioning == "rigger" else None
        )
        denoise_blocks = install_facefusion(self.unet_denoise)
        self._capture = IdentityCapture(self.unet_id)
        if denoise_blocks != self._capture.block_names:
            raise ValueError("unet_denoise and unet_id must have the same transformer blocks")
        for p in unused_identity_parameters(self.unet_id):
            p.requires_grad_(False)

    # ------------------------------------------------------------------ parts

    @property
    def num_identity_blocks(self) -> int:
        return len(self._capture.block_names)

    def encode_identity(self, source_latents: torch.Tensor, text_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Identity Encoder at timestep 0: each transformer block's input, keyed by block name."""
        batch = source_latents.shape[0]
        timestep = torch.zeros(batch, device=source_latents.device, dtype=torch.long)
        store = self._capture.start()
        try:
            self.unet_id(source_latents, timestep, encoder_hidden_states=_batched(text_embedding, batch))
        finally:
            self._capture.stop()
        return store

    def denoise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        identity: IdentityTokens | None,
        cond_latents: torch.Tensor,
        expression: torch.Tensor,
        text_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """One Denoising UNet evaluation; ``identity=None`` runs it without FaceFusion (for comparisons)."""
        batch = noisy_latents.shape[0]
        dtype = self.unet_denoise.dtype
        sample = noisy_latents
        residuals = None
        if self.rigger is None:
            sample = torch.cat([noisy_latents, cond_latents.to(noisy_latents.dtype)], dim=1)
        else:
            # Block 0 gets nothing (a scalar zero broadcasts), block 1 the rigger output at half resolution.
            zero = torch.zeros((), device=noisy_latents.device, dtype=dtype)
            residuals = [zero, self.rigger(cond_latents.to(dtype))]
        class_labels = self.expression_proj(expression.to(self.expression_proj.weight.dtype))
        kwargs = {IDENTITY_KWARG: identity} if identity is not None else None
        return self.unet_denoise(
            sample,
            timesteps,
            encoder_hidden_states=_batched(text_embedding, batch),
            class_labels=class_labels,
            cross_attention_kwargs=kwargs,
            down_intrablock_additional_residuals=residuals,
            return_dict=False,
        )[0]

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        source_latents: torch.Tensor,
        cond_latents: torch.Tensor,
        expression: torch.Tensor,
        text_embedding: torch.Tensor,
    ) -> torch.Tensor:
        identity = self.encode_identity(source_latents, text_embedding)
        return self.denoise(noisy_latents, timesteps, identity, cond_latents, expression, text_embedding)

    # ------------------------------------------------------------------ utilities

    def parameter_counts(self, trainable_only: bool = False) -> dict[str, int]:
        """Parameters per part and in total."""
        parts = {"unet_denoise": self.unet_denoise, "unet_id": self.unet_id, "expression_proj": self.expression_proj}
        if self.rigger is not None:
            parts["rigger"] = self.rigger
        counts = {
            name: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)
            for name, m in parts.items()
        }
        counts["total"] = sum(counts.values())
        return counts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def identity_block_names(self) -> list[str]:
        return [name for name, _ in transformer_blocks(self.unet_denoise)]


def _batched(text_embedding: torch.Tensor, batch: int) -> torch.Tensor:
    if text_embedding.shape[0] == batch:
        return text_embedding
    if text_embedding.shape[0] != 1:
        raise ValueError(f"text embedding batch {text_embedding.shape[0]} does not match {batch}")
    return text_embedding.expand(batch, -1, -1)
