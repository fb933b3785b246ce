"""How a Ray Train worker holds the model: DDP replicas or FSDP2 shards; AdamW in fp32 or 8-bit state.

Why: full fine-tuning of both SD-1.5 UNets is ~1.72 B trainable parameters, so fp32 weights + gradients + AdamW
state are ~27.5 GB per DDP rank, more than a 24 GB GPU. FSDP2 (``torch.distributed.fsdp.fully_shard``) splits
weights, gradients and optimizer state over the ranks, and bitsandbytes' AdamW8bit stores the two moments in
8 bits (2 bytes per parameter instead of 8). rigface.model.memory estimates what each combination needs.

Everything here is what differs between the strategies; ``pipelines.train.train_func`` calls it without
branching on the strategy itself.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


class StrategyError(ValueError):
    """A combination of train options that cannot run."""


def make_optimizer(params, *, name: str, lr: float, weight_decay: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise StrategyError("train.optimizer=adamw8bit needs bitsandbytes (pip install 'bitsandbytes>=0.48')") \
                from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise StrategyError(f"unknown optimizer {name!r}")


def check_options(strategy: str, optimizer: str, ema: bool) -> None:
    if strategy not in ("ddp", "fsdp"):
        raise StrategyError(f"unknown strategy {strategy!r}")
    if strategy == "fsdp" and ema:
        raise StrategyError("train.ema_decay is not supported with train.strategy=fsdp (the EMA copy would be "
                            "a full unsharded replica, which is what fsdp avoids)")
    if strategy == "fsdp" and optimizer == "adamw8bit":
        raise StrategyError("train.optimizer=adamw8bit works on whole tensors, not FSDP shards (DTensor): use "
                            "it with train.strategy=ddp, or shard with fsdp and the fp32 adamw")


def shard_units(model) -> list:
    """The Denoising UNet's down/mid/up blocks: FSDP2 gathers them one at a time, forward and backward."""
    unet = model.unet_denoise
    return [u for u in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if u is not None]


class Strategy:
    """The model as trained (``train_model``), gradient sync control, clipping and full state for checkpoints."""

    def __init__(self, name: str, model, device, world: int, mixed_precision: str = "no"):
        self.name = name
        self.mixed_precision = mixed_precision
        self.model = model
        self.model_class = type(model)  # fully_shard swaps the instance's class for an FSDP subclass
        self.world = world
        self.device = device
        self.train_model = model

    def wrap(self) -> Any:
        if self.name == "fsdp":
            self._fully_shard()
        else:
            import ray.train.torch

            # DDP: gloo on CPU, NCCL on GPU; gradients as views of the buckets, so they are not held twice.
            ddp = ray.train.torch.prepare_model(self.model, move_to_device=False,
                                                parallel_strategy_kwargs={"gradient_as_bucket_view": True})
            if ddp is not self.model:
                ddp.config = self.model.config  # training_step reads model.config; the DDP wrapper hides it
            self.train_model = ddp
        return self.train_model

    def _fully_shard(self) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        world = dist.get_world_size() if dist.is_initialized() else 1
        if not dist.is_initialized():
            raise StrategyError("train.strategy=fsdp needs a process group (Ray Train starts one)")
        mesh = init_device_mesh(self.device.type, (world,))
        kw = {"mesh": mesh}
        if self.device.type == "cuda" and self.mixed_precision in ("bf16", "fp16"):
            # Gather weights in half precision (no fp32 copy plus autocast cast), reduce gradients in fp32.
            half = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
        for unit in shard_units(self.model):
            fully_shard(unit, **kw)
        # The Identity Encoder is one unit that stays gathered from its forward to the end of the backward: the
        # identity tokens leave it from inside its blocks (hooks on block inputs) and its own output is unused,
        # so FSDP's per-unit backward hooks would never fire to gather it again. Its gradients are reduce-scattered
        # by the root's end-of-backward callback.
        fully_shard(self.model.unet_id, reshard_after_forward=False, **kw)
        fully_shard(self.model, **kw)  # in place: same object, its parameters are now DTensor shards
        self.train_model = self.model

    def no_sync(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.name == "fsdp":
            self.model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last_micro else self.train_model.no_sync()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        import torch

        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(total, "full_tensor", None)  # a DTensor under FSDP2
        return float(full() if full is not None else total)

    # -- state for checkpoints: every rank must call these (FSDP gathers); the full state lands on every rank
    def full_model_state(self) -> dict[str, Any]:
        if self.name != "fsdp":
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, optimizer) -> dict[str, Any]:
        if self.name != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state(self, model_state, optimizer, optimizer_state) -> None:
        if self.name != "fsdp":
            self.model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=opts)
        set_optimizer_state_dict(self.model, optimizer, optimizer_state, options=opts)

    def unsharded_copy(self, full_state):
        """A plain module with the full weights (rank 0 saves it): the model itself under DDP."""
        if self.name != "fsdp":
            return self.model
        # the constructor, not from_config: diffusers' from_config drops init arguments named '*_config'
        copy = self.model_class(**{k: v for k, v in self.model.config.items() if not k.startswith("_")})
        copy.load_state_dict(full_state)
        return copy
