"""FaceFusion on stock diffusers UNets: identity capture hooks and a self-attention processor.

The Identity Encoder's transformer blocks are observed with forward pre-hooks (their input ``hidden_states``:
after the Transformer2D ``proj_in``, before ``norm1``). The Denoising UNet's self-attention (``attn1``) gets a
processor whose queries come from its own tokens and whose keys/values come from its tokens concatenated with the
same block's identity tokens, normalized by the *denoising* block's ``norm1``. This equals running full
self-attention over both halves and keeping the denoising half, at half the cost (N x 2N scores instead of 2N x 2N),
and the feed-forward and cross-attention only ever see N tokens.

Identity tokens travel through ``cross_attention_kwargs={"identity_tokens": {block_name: tensor}}``: the public
path diffusers uses to hand per-call state to processors. Unlike a side channel, it is replayed correctly when
diffusers' gradient checkpointing recomputes a block in the backward pass.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

IDENTITY_KWARG = "identity_tokens"


def transformer_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """Every BasicTransformerBlock of a UNet with its module name (16 in SD-1.5), in registration order
    (down, up, mid: not the forward order; identity tokens are keyed by name, so order never matters)."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


class FaceFusionAttnProcessor:
    """Scaled-dot-product attention that can take extra key/value tokens from the Identity Encoder.

    A plain object, not an nn.Module, on purpose: it holds a reference to its block's ``norm1`` and must not
    register it a second time in the state dict. With ``fuse=False`` (cross-attention) it only accepts and ignores
    the identity kwarg, so diffusers does not warn about it on every call.
    """

    def __init__(self, block_name: str, norm: nn.Module | None = None, fuse: bool = True):
        self.block_name = block_name
        self.norm = norm
        self.fuse = fuse

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        identity_tokens: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("FaceFusion supports the SD-1.5 attention layout only (no masks, no norms)")
        if hidden_states.ndim != 3:
            raise ValueError(f"expected (batch, tokens, channels) hidden states, got {tuple(hidden_states.shape)}")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.fuse and identity_tokens is not None:
            identity = identity_tokens[self.block_name]
            if identity.shape[0] != hidden_states.shape[0]:
                if identity.shape[0] != 1:
                    raise ValueError(
                        f"identity batch {identity.shape[0]} does not match denoising batch {hidden_states.shape[0]}"
                    )
                identity = identity.expand(hidden_states.shape[0], -1, -1)
            # The denoising block's own norm1, as in the released model: both halves share one normalization.
            identity = self.norm(identity.to(hidden_states.dtype))
            context = torch.cat([hidden_states, identity], dim=1)
        batch = hidden_states.shape[0]
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        scale = None if abs(attn.scale - head_dim**-0.5) < 1e-12 else attn.scale  # default scale: fastest kernel
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_facefusion(unet: nn.Module) -> list[str]:
    """Give every transformer block of the Denoising UNet FaceFusion processors; returns the block names."""
    names = []
    for name, block in transformer_blocks(unet):
        block.attn1.set_processor(FaceFusionAttnProcessor(name, norm=block.norm1, fuse=True))
        if block.attn2 is not None:
            block.attn2.set_processor(FaceFusionAttnProcessor(name, fuse=False))
        names.append(name)
    return names


class IdentityCapture:
    """Forward pre-hooks that keep each transformer block's input while capture is on.

    Off by default, so the recomputation that gradient checkpointing runs in the backward pass (outside
    ``capture()``) never overwrites anything.
    """

    def __init__(self, unet: nn.Module):
        self._store: dict[str, torch.Tensor] | None = None
        self.block_names = []
        for name, block in transformer_blocks(unet):
            block.register_forward_pre_hook(_CaptureHook(self, name), with_kwargs=True)
            self.block_names.append(name)

    def start(self) -> dict[str, torch.Tensor]:
        self._store = {}
        return self._store

    def stop(self) -> None:
        self._store = None


class _CaptureHook:
    """A hook object rather than a closure, so copy.deepcopy of the model (EMA copies) rebinds it to the copy."""

    def __init__(self, capture: IdentityCapture, name: str):
        self.capture = capture
        self.name = name

    def __call__(self, module, args, kwargs):
        store = self.capture._store
        if store is not None:
            store[self.name] = args[0] if args else kwargs["hidden_states"]


def unused_identity_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """Parameters of the Identity Encoder that never reach a kept block input: its last transformer block, that
    transformer's proj_out and the output head. They get no gradient, so they are frozen (DDP needs every trainable
    parameter to take part, or find_unused_parameters and its extra traversal)."""
    up_blocks = getattr(unet, "up_blocks", None)
    attentions = getattr(up_blocks[-1], "attentions", None) if up_blocks else None
    if not attentions:
        return []
    transformer = attentions[-1]  # the last transformer in forward order
    last_block = transformer.transformer_blocks[-1]
    params = list(last_block.parameters()) + list(transformer.proj_out.parameters())
    for head in ("conv_norm_out", "conv_out"):
        module = getattr(unet, head, None)
        if module is not None:
            params += list(module.parameters())
    return params
