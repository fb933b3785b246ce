"""Face-analysis section of the config. Light on purpose: importing it must not import mediapipe or cv2."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: Literal["yunet", "mediapipe", "insightface"] = "yunet"
    fit: Literal["landmarker", "deca"] = "landmarker"
    expression: Literal["blendshapes", "deep3d"] = "blendshapes"
    mask: Literal["landmarks", "bisenet"] = "landmarks"
    identity: Literal["sface", "arcface"] = "sface"
    crop_size: int = Field(512, gt=0)
    multi_face: Literal["largest", "skip"] = "largest"
    min_face_size: int = Field(64, ge=1, description="smallest face box side, in source pixels")
    min_confidence: float = Field(0.6, ge=0.0, le=1.0)
    # Folder or s3:// URI with user-supplied weights for the paper-faithful backends.
    weights: str | None = None
