"""Model section of the config. Light on purpose: importing it must not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 'tiny' builds small random UNets (CPU tests, the demo); 'sd15' the real SD-1.5 sizes.
    preset: Literal["tiny", "sd15"] = "tiny"
    # Stable Diffusion 1.5 folder in diffusers layout: local path, s3:// URI, or hub id. None: random init.
    pretrained: str | None = None
    # Released RigFace checkpoint folder holding unet_denoise/ and unet_id/ (local path or s3:// URI).
    released: str | None = None
    conditioning: Literal["concat", "rigger"] = "concat"
    expression_dim: int = Field(52, gt=0, description="64 for BFM (Deep3DFaceRecon), 52 for blendshapes")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    resolution: int = Field(512, gt=0, multiple_of=8)
    prompt: str = "A close up of a person."
