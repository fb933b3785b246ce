"""Peak GPU memory per training rank, estimated on a CPU: parameter counts plus measured activation sizes.

Nothing here allocates real weights: the model is built on the ``meta`` device (true shapes, no storage), one
training step runs there, and autograd's saved-tensor hooks record the bytes each saved activation would take.
The per-rank total then adds weights, gradients, optimizer state and the buffers each strategy keeps:

  weights        fp32 model (4 B/param), sharded over the ranks under fsdp, plus the frozen fp32 VAE
  autocast copy  ddp: bf16 casts of the weights made in the forward pass (2 B/param); fsdp gathers in bf16
  gradients      fp32 (4 B/param), sharded under fsdp; ddp's gradients are views of its buckets
  optimizer      AdamW: two fp32 moments (8 B/param); AdamW8bit: two 8-bit moments (2 B/param)
  fsdp gathered  bf16: the Identity Encoder, gathered through the whole step (see pipelines.train_strategy),
                 and its unsharded gradients; the two largest Denoising UNet blocks in flight
  activations    saved tensors of the step (bf16 under autocast: half the fp32 bytes measured here; attention
                 saves what a fused kernel saves), with gradient checkpointing the kept boundaries plus the
                 largest recomputed region
  runtime        CUDA context, cuDNN/cuBLAS workspaces and allocator slack: a flat 1.5 GiB

It is an estimate to choose a configuration, not a guarantee; bench/gpu.py measures the real peak on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

GIB = 2**30
RUNTIME_BYTES = int(1.5 * GIB)


@dataclass(frozen=True)
class ParamCounts:
    model: int  # every parameter of RigFaceModel (both UNets, expression projection)
    trainable: int
    unet_id: int
    largest_unit: int  # the largest Denoising UNet block: the unit FSDP gathers at a time
    vae: int


@dataclass(frozen=True)
class ActivationSizes:
    """Bytes saved for the backward pass per sample, in fp32 as measured on meta tensors."""

    full: int  # no checkpointing
    checkpointed: int  # what stays saved with gradient checkpointing
    largest_region: int  # the biggest block recomputed at once during the checkpointed backward


def _meta_components(preset: str, resolution: int, expression_dim: int):
    import torch

    from rigface.model.build import build_rigface
    from rigface.model.config import ModelConfig

    with torch.device("meta"):
        return build_rigface(ModelConfig(preset=preset, resolution=resolution, expression_dim=expression_dim))


def count_parameters(components) -> ParamCounts:
    model = components.model
    unet = model.unet_denoise
    units = [u for u in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if u is not None]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return ParamCounts(model=n(model), trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       unet_id=n(model.unet_id), largest_unit=max(n(u) for u in units), vae=n(components.vae))


def _batch(batch_size: int, resolution: int, expression_dim: int, device=None):
    import torch

    batch = {k: torch.zeros(batch_size, 3, resolution, resolution, device=device)
             for k in ("source", "target", "render", "background")}
    batch["expression"] = torch.zeros(batch_size, expression_dim, device=device)
    return batch


class _SavedBytes:
    """Sums the bytes of tensors autograd saves for backward, leaving out parameters (counted separately)."""

    def __init__(self, params: Iterable):
        self.param_ids = {id(p) for p in params}
        self.total = 0

    def pack(self, t):
        if id(t) not in self.param_ids:
            self.total += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@contextlib.contextmanager
def flash_attention_saves():
    """Attention that saves what a fused GPU kernel saves (q, k, v, output, log-sum-exp), not the score matrix:
    on meta tensors SDPA falls back to the math path, whose saved N x M scores no GPU kernel keeps."""
    import torch
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p or kw:
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, is_causal=is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def saved_activation_bytes(components, batch, gradient_checkpointing: bool) -> tuple[int, int]:
    """(bytes saved for backward by one training step on ``batch``, the largest single block's share).

    Works on real or meta tensors. A block is a resnet or transformer of either UNet: the regions diffusers'
    gradient checkpointing recomputes one at a time.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from rigface.model.training import training_step

    model = components.model
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    counter = _SavedBytes(model.parameters())
    regions: list[int] = []
    handles = []
    if not gradient_checkpointing:  # region sizes come from the uncheckpointed pass
        starts: dict[int, int] = {}

        def pre(module, args):
            starts[id(module)] = counter.total

        def post(module, args, out):
            regions.append(counter.total - starts.pop(id(module), counter.total))

        for m in model.modules():
            if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with counter.hooks(), flash_attention_saves():
            loss = training_step(components, batch, generator=None)
        total = counter.total
        if loss.device.type != "meta":
            loss.backward()  # real tensors: make sure the step is a valid training step
    finally:
        for h in handles:
            h.remove()
        if gradient_checkpointing:
            model.disable_gradient_checkpointing()
    return total, max(regions, default=0)


def measure(preset: str = "sd15", resolution: int = 512, expression_dim: int = 64,
            batch_size: int = 1) -> tuple[ParamCounts, ActivationSizes]:
    """Parameter counts and per-sample activation bytes of a preset, on meta tensors (seconds, no memory)."""
    c = _meta_components(preset, resolution, expression_dim)
    c.model.train()
    import torch

    with torch.device("meta"):
        batch = _batch(batch_size, resolution, expression_dim)
    full, region = saved_activation_bytes(c, batch, gradient_checkpointing=False)
    kept, _ = saved_activation_bytes(c, batch, gradient_checkpointing=True)
    return count_parameters(c), ActivationSizes(full // batch_size, kept // batch_size, region // batch_size)


@dataclass(frozen=True)
class MemoryEstimate:
    strategy: str
    world: int
    optimizer: str
    gradient_checkpointing: bool
    batch_size: int
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, gib: float) -> bool:
        return self.total <= gib * GIB


def estimate(params: ParamCounts, acts: ActivationSizes, *, strategy: str, world: int, optimizer: str,
             gradient_checkpointing: bool, batch_size: int, bf16: bool = True) -> MemoryEstimate:
    """Peak bytes per rank of one configuration (see the module docstring for each part)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"unknown optimizer {optimizer!r}")
    shard = world if strategy == "fsdp" else 1
    p, t = params.model, params.trainable
    half = 2 if bf16 else 4
    parts = {
        "weights": 4 * p // shard + 4 * params.vae,
        "autocast copy": (2 * p if bf16 and strategy == "ddp" else 0),
        "gradients": 4 * t // shard,
        "optimizer": (8 if optimizer == "adamw" else 2) * t // shard,
    }
    if strategy == "fsdp":
        parts["fsdp gathered"] = (2 * params.unet_id + 2 * params.largest_unit) * half
    per_sample = acts.checkpointed + acts.largest_region if gradient_checkpointing else acts.full
    parts["activations"] = int(per_sample * batch_size * (0.5 if bf16 else 1.0))
    parts["runtime"] = RUNTIME_BYTES
    return MemoryEstimate(strategy, world, optimizer, gradient_checkpointing, batch_size, parts)


CONFIGS = (
    ("ddp", 2, "adamw", True),
    ("ddp", 2, "adamw8bit", True),
    ("fsdp", 2, "adamw", True),
    ("fsdp", 4, "adamw", True),
    ("fsdp", 8, "adamw", True),
    ("ddp", 2, "adamw8bit", False),
    ("fsdp", 2, "adamw", False),
    ("fsdp", 8, "adamw", False),
)


def table(params: ParamCounts, acts: ActivationSizes, batch_size: int = 4, gib: float = 24.0,
          configs=CONFIGS) -> list[MemoryEstimate]:
    return [estimate(params, acts, strategy=s, world=w, optimizer=o, gradient_checkpointing=g,
                     batch_size=batch_size) for s, w, o, g in configs]


def format_table(estimates: list[MemoryEstimate], gib: float = 24.0) -> str:
    keys = list(dict.fromkeys(k for e in estimates for k in e.parts))
    head = ["strategy", "ranks", "optimizer", "ckpt", "batch", *keys, "total GiB", f"fits {gib:g} GB"]
    rows = []
    for e in estimates:
        rows.append([e.strategy, str(e.world), e.optimizer, "yes" if e.gradient_checkpointing else "no",
                     str(e.batch_size), *[f"{e.parts.get(k, 0) / GIB:.1f}" for k in keys], f"{e.total / GIB:.1f}",
                     "yes" if e.fits(gib) else "no"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, rows)])
