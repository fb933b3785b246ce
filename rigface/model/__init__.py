"""The RigFace model on stock diffusers: FaceFusion, conditioning, training step, editing pipeline, checkpoints.

Public API (imported lazily, so ``rigface.model.config`` stays light and torch-free):

    build_rigface(cfg: ModelConfig, seed=0) -> RigFaceComponents(model, vae, text_embedding, noise_scheduler, config)
    RigFaceModel.forward(noisy_latents, timesteps, source_latents, cond_latents, expression, text_embedding)
        .encode_identity(source_latents, text_embedding) -> {block: tokens}
        .denoise(noisy_latents, timesteps, identity, cond_latents, expression, text_embedding)
        .enable_gradient_checkpointing(), .parameter_counts(), .trainable_parameters()
    training_step(components, batch, generator=None, model=None) -> scalar loss
    RigFacePipeline.from_components(components, scheduler=None)(source, background, render, expression,
        num_inference_steps=50, generator=None, output_type="pil" | "np" | "pt")
        (the scheduler defaults to authors_sampler(noise_config): UniPC as the authors sampled)
    save_rigface(components_or_pipeline, path) / load_rigface(uri, device="cpu", dtype=None, scheduler=None)
        -> RigFacePipeline: the pipeline's own diffusers folder, local, s3:// or MLflow URI
    load_released(model, uri, checkpoint=None), CheckpointError, BatchError
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# diffusers imports bitsandbytes (train.optimizer=adamw8bit) when installed; on CPUs with AVX512-BF16 its CPU
# backend then warns on every import about a 4-bit GEMM kernel package that nothing here uses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "RigFaceModel": "rigface.model.rigface_model",
    "AttributeRigger": "rigface.model.rigface_model",
    "RigFaceComponents": "rigface.model.build",
    "build_rigface": "rigface.model.build",
    "init_from_sd_unet": "rigface.model.build",
    "encode_prompt": "rigface.model.build",
    "training_step": "rigface.model.training",
    "BatchError": "rigface.model.training",
    "RigFacePipeline": "rigface.model.pipeline",
    "PromptEmbedding": "rigface.model.pipeline",
    "authors_sampler": "rigface.model.pipeline",
    "save_rigface": "rigface.model.checkpoint",
    "load_rigface": "rigface.model.checkpoint",
    "load_released": "rigface.model.released",
    "map_released_key": "rigface.model.released",
    "CheckpointError": "rigface.model.released",
    "FaceFusionAttnProcessor": "rigface.model.facefusion",
    "ModelConfig": "rigface.model.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rigface.model' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from rigface.model.build import RigFaceComponents, build_rigface, encode_prompt, init_from_sd_unet
    from rigface.model.checkpoint import load_rigface, save_rigface
    from rigface.model.config import ModelConfig
    from rigface.model.facefusion import FaceFusionAttnProcessor
    from rigface.model.pipeline import PromptEmbedding, RigFacePipeline, authors_sampler
    from rigface.model.released import CheckpointError, load_released, map_released_key
    from rigface.model.rigface_model import AttributeRigger, RigFaceModel
    from rigface.model.training import BatchError, training_step
