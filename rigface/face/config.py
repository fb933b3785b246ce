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
    crop_scale: float = Field(2.2, gt=1.0, description="crop side / face box side; >1 keeps partial background")
    crop_step: float = Field(
        0.05, ge=0.0, lt=0.5, description="crop-box snapping step (fraction of the side): stable crops across frames"
    )
    detect_max_side: int = Field(1280, ge=64, description="frames larger than this are downscaled for detection")
    mask_work_size: int = Field(160, ge=32, description="GrabCut runs at this size, then is upscaled")
    # Folder or s3:// URI with user-supplied weights for the paper-faithful backends.
    weights: str | None = None
