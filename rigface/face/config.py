"""Face-analysis section of the config. Light on purpose: importing it must not import mediapipe or cv2."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: Literal["yunet", "mediapipe", "insightface"] = "yunet"
    fit: Literal["landmarker", "deca"] = "landmarker"
    expression: Literal["blendshapes", "deep3d"] = "blendshapes"
    mask: Literal["landmarks", "grabcut", "bisenet"] = "landmarks"
    identity: Literal["sface", "arcface"] = "sface"
    crop_size: int = Field(512, gt=0)
    multi_face: Literal["largest", "skip"] = "largest"
    min_face_size: int = Field(64, ge=1, description="smallest face box side, in source pixels")
    min_confidence: float = Field(0.6, ge=0.0, le=1.0)
    crop_policy: Literal["auto", "default", "paper"] = Field(
        "auto", description="paper: the authors' crop (2.18 x box width, box centre, bilinear); auto: paper with "
        "detector=insightface, else default (crop_scale, crop_step)"
    )
    crop_scale: float = Field(2.2, gt=1.0, description="crop side / face box side; >1 keeps partial background")
    crop_step: float = Field(
        0.05, ge=0.0, lt=0.5, description="crop-box snapping step (fraction of the side): stable crops across frames"
    )
    crop_min_scale: float = Field(
        1.4, gt=1.0, description="least context: when the frame is too small for crop_scale, the side shrinks "
        "to the frame but not below this x face size; only then is the rest padded (mirrored pixels)")
    crop_pad_mode: Literal["reflect", "replicate"] = "reflect"
    max_padded_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="frames whose crop needs more padding than this (area fraction) are "
        "a recorded skip too_much_padding")
    detect_max_side: int = Field(1280, ge=64, description="frames larger than this are downscaled for detection")
    mask_work_size: int = Field(128, ge=32, description="the head mask is computed at this size, then upscaled")
    # Folder or s3:// URI with user-supplied weights for the paper-faithful backends (rigface.face.backends).
    weights: str | None = None
    # File names below are relative to `weights` unless absolute paths or URIs.
    deep3d_checkpoint: str = Field(
        "d3dfr_res50_nofc.pth", description="Face-Adapter's Deep3DFaceRecon (the authors'); or the original epoch_20.pth"
    )
    deep3d_input_size: int | None = Field(
        None, ge=64, description="None: the checkpoint's own (256 for d3dfr_res50_nofc.pth, 224 for epoch_20.pth)"
    )
    bfm_model: str = "BFM_model_front.mat"
    bfm_landmarks: str | None = Field(None, description="optional similarity_Lm3D_all.mat (else the BFM keypoints)")
    bisenet_checkpoint: str = "79999_iter.pth"
    bisenet_input_size: int = Field(512, ge=64)
    insightface_pack: str = Field("antelopev2", description="model-pack folder (antelopev2 or buffalo_l)")
    insightface_det_size: int = Field(640, ge=64, description="SCRFD input side for dynamic-size models")
    deca_checkpoint: str = "deca_model.tar"
    flame_model: str = "generic_model.pkl"
    flame_albedo: str = Field("FLAME_texture.npz", description="FLAME texture space (DECA's tex codes; the authors')")
    flame_uv: str = Field("head_template.obj", description="FLAME's UV layout (DECA's data folder)")
    flame_landmarks: str = Field("landmark_embedding.npy", description="FLAME landmark embedding (DECA's data folder)")
    backend_device: str = Field("cpu", description="torch/onnxruntime device for these backends, e.g. cuda")
