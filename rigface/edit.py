"""Edit a portrait with a trained RigFace model: the Python API behind `rigface edit`.

    editor = PortraitEditor.load("s3://bucket/runs/x/model", cfg)
    result = editor.edit(source_rgb, driver_rgb, edit="pose")
    Image.fromarray(result.image).save("out.png")

The source and the driver are analysed by the face backends; the conditions follow the paper (the driver's
expression; the source's face shape rendered with the driver's pose and/or lighting; the background composite with
the source mask, or the union of source and driver masks for pose edits); the pipeline generates the 512 crop, and
the crop is pasted back into the full source image.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rigface.config import RigFaceConfig

log = logging.getLogger(__name__)

Edit = Literal["expression", "pose", "lighting", "all"]
EDITS: tuple[str, ...] = ("expression", "pose", "lighting", "all")


class EditError(ValueError):
    """The inputs cannot be edited (unreadable file, no face, several faces, ...)."""


@dataclass
class EditResult:
    image: np.ndarray  # the full source image with the edited face pasted back, uint8 RGB
    crop: np.ndarray  # the generated 512 crop, uint8 RGB
    render: np.ndarray  # the condition image fed to the model
    background: np.ndarray  # the background composite fed to the model


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB uint8 array from a local path or s3:// URI; a clear error when it is not an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    from rigface.data import storage

    try:
        data = storage.read_bytes(str(path))
    except FileNotFoundError as exc:
        raise EditError(f"no such image: {path}") from exc
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise EditError(f"not a readable image: {path}") from exc


class PortraitEditor:
    """Face analysis + a loaded RigFace pipeline; build once, edit many portraits."""

    def __init__(self, pipeline, cfg: RigFaceConfig, analyzer=None):
        from rigface.face import FaceAnalyzer

        self.cfg = cfg
        self.pipeline = pipeline  # a RigFacePipeline
        self.analyzer = analyzer or FaceAnalyzer(cfg.face)

    @classmethod
    def load(cls, model: str, cfg: RigFaceConfig, device: str | None = None, analyzer=None) -> "PortraitEditor":
        import torch

        from rigface.model import load_rigface

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ev = cfg.evaluate  # fp32 and the model's own sampler unless the config opts out
        return cls(load_rigface(model, device=device, dtype=ev.torch_dtype(), scheduler=ev.scheduler), cfg, analyzer)

    def _fit(self, image: np.ndarray, role: str):
        from rigface.face.types import FaceSkip

        fit = self.analyzer.analyze(image)
        if isinstance(fit, FaceSkip):
            raise EditError(f"{role} image: {fit.reason.value.replace('_', ' ')} ({fit.detail})")
        return fit

    def edit(
        self,
        source: np.ndarray,
        driver: np.ndarray,
        edit: Edit = "all",
        num_inference_steps: int | None = None,
        seed: int = 0,
    ) -> EditResult:
        import torch

        from rigface.face import build_conditions, paste_back

        if edit not in EDITS:
            raise EditError(f"edit must be one of {', '.join(EDITS)}, got {edit!r}")
        src_fit = self._fit(source, "source")
        drv_fit = self._fit(driver, "driver")
        cond = build_conditions(src_fit, drv_fit, edit)
        steps = num_inference_steps or self.cfg.evaluate.num_inference_steps
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = self.pipeline(
            source=[src_fit.crop],
            background=[cond.background],
            render=[cond.render],
            expression=np.asarray(cond.expression, dtype=np.float32)[None],
            num_inference_steps=steps,
            generator=generator,
            output_type="np",
        )
        crop = np.asarray(getattr(out, "images", out))[0]  # uint8 (H, W, 3): output_type="np"
        size = src_fit.crop.shape[0]
        if crop.shape[0] != size:
            from PIL import Image

            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
        # Paste only the head region back, so the untouched background stays pixel-exact.
        head = np.maximum(cond.mask_source, cond.mask_target) if edit in ("pose", "all") else cond.mask_source
        image = paste_back(source if source.ndim == 3 else np.stack([source] * 3, -1), crop, src_fit.crop_box, head)
        return EditResult(image=image, crop=crop, render=cond.render, background=cond.background)

