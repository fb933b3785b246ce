"""Model section of the config. Light on purpose: importing it must not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 'tiny' builds small random UNets (CPU tests, the demo); 'sd15' the real SD-1.5 sizes.
    preset: Literal["tiny", "sd15"] = "tiny"
    # Stable Diffusion 1.5 folder in diffusers layout: local path, s3:// URI, or hub id. None: random init.
    pretrained: str | None = None
    # The authors' released RigFace folder holding unet_denoise/ and unet_id/ (local path or s3:// URI), each
    # either holding its safetensors or, as published, checkpoint-N/ folders that do.
    released: str | None = None
    # Which checkpoint-N/ of the release to load (e.g. 'checkpoint-70000'); None: the newest (highest N).
    released_checkpoint: str | None = Field(None, pattern=r"^checkpoint-\d+$")
    conditioning: Literal["concat", "rigger"] = "concat"
    expression_dim: int = Field(52, gt=0, description="64 for BFM (Deep3DFaceRecon), 52 for blendshapes")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    resolution: int = Field(512, gt=0, multiple_of=8)
    prompt: str = "A close up of a person."

    @field_validator("released")
    @classmethod
    def _released_needs_pretrained(cls, released: str | None, info: ValidationInfo) -> str | None:
        if released and not info.data.get("pretrained"):
            raise ValueError(
                "model.released needs model.pretrained (the Stable Diffusion 1.5 folder): the release holds only "
                "the two UNets, and they were trained with SD-1.5's VAE and CLIP text encoder; without them the "
                "VAE and the text embedding would be random")
        return released
