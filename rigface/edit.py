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
        on_gpu = next(pipeline.model.parameters()).device.type == "cuda"
        # channels-last pays off on GPU convolutions; torch.compile only when asked (minutes of warm-up)
        self.pipeline.optimize_for_speed(channels_last=cfg.evaluate.channels_last and on_gpu,
                                         compile=cfg.evaluate.compile)
        self.analyzer = analyzer or FaceAnalyzer(cfg.face)

    @classmethod
    def load(cls, model: str, cfg: RigFaceConfig, device: str | None = None, analyzer=None) -> "PortraitEditor":
        import torch

        from rigface.model import load_rigface

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ev = cfg.evaluate  # fp32 and the model's own sampler unless the config opts out
        pipe = load_rigface(model, device=device, dtype=ev.torch_dtype(), scheduler=ev.scheduler, model_cfg=cfg.model)
        return cls(pipe, cfg, analyzer)

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
        return self.edit_many([source], [driver], edit, num_inference_steps, seed)[0]

    def edit_many(
        self,
        sources: list[np.ndarray],
        drivers: list[np.ndarray],
        edit: Edit = "all",
        num_inference_steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> list[EditResult]:
        """Edit ``sources[i]`` after ``drivers[i]`` (one source or one driver is reused for every pair), in
        batches of ``batch_size`` (default ``evaluate.batch_size``) through one pipeline call each. Every edit
        draws its noise from its own generator seeded ``seed``, so an edit is the same alone or in a batch."""
        import torch

        from rigface.face import build_conditions, paste_back

        if edit not in EDITS:
            raise EditError(f"edit must be one of {', '.join(EDITS)}, got {edit!r}")
        n = max(len(sources), len(drivers))
        if not sources or not drivers or len(sources) not in (1, n) or len(drivers) not in (1, n):
            raise EditError(f"give one source or as many as drivers: {len(sources)} source(s), "
                            f"{len(drivers)} driver(s)")
        sources = sources * n if len(sources) == 1 else sources
        drivers = drivers * n if len(drivers) == 1 else drivers
        fits: dict[int, object] = {}  # a repeated image (same array) is analysed once

        def fit(image, role):
            if id(image) not in fits:
                fits[id(image)] = self._fit(image, role)
            return fits[id(image)]

        pairs = [(fit(s, "source"), fit(d, "driver")) for s, d in zip(sources, drivers)]
        conds = [build_conditions(sf, df, edit) for sf, df in pairs]
        steps = num_inference_steps or self.cfg.evaluate.num_inference_steps
        size = batch_size or self.cfg.evaluate.batch_size
        crops: list[np.ndarray] = []
        for lo in range(0, n, size):
            chunk = range(lo, min(n, lo + size))
            out = self.pipeline(
                source=[pairs[i][0].crop for i in chunk],
                background=[conds[i].background for i in chunk],
                render=[conds[i].render for i in chunk],
                expression=np.stack([np.asarray(conds[i].expression, dtype=np.float32) for i in chunk]),
                num_inference_steps=steps,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for _ in chunk],
                output_type="np",
            )
            crops += list(np.asarray(getattr(out, "images", out)))  # uint8 (B, H, W, 3): output_type="np"
        results = []
        for (src_fit, _), cond, source, crop in zip(pairs, conds, sources, crops):
            size_px = src_fit.crop.shape[0]
            if crop.shape[0] != size_px:
                from PIL import Image

                crop = np.asarray(Image.fromarray(crop).resize((size_px, size_px), Image.BICUBIC))
            # Paste only the head region back, so the untouched background stays pixel-exact.
            head = np.maximum(cond.mask_source, cond.mask_target) if edit in ("pose", "all") else cond.mask_source
            image = paste_back(source if source.ndim == 3 else np.stack([source] * 3, -1), crop, src_fit.crop_box,
                               head)
            results.append(EditResult(image=image, crop=crop, render=cond.render, background=cond.background))
        return results
