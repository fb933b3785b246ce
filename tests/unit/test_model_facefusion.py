"""FaceFusion equals 'concatenate, full self-attention, keep the denoising half'; every input path is live."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from rigface.model.facefusion import transformer_blocks
from rigface.model.presets import TINY_UNET, unet_configs
from rigface.model.rigface_model import RigFaceModel


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict = {}


def make_model(conditioning="concat", seed=0):
    """Built once per conditioning (tests that change weights restore them)."""
    if (conditioning, seed) not in _MODELS:
        _MODELS[(conditioning, seed)] = _build(conditioning, seed)
    return _MODELS[(conditioning, seed)].eval()


def _build(conditioning, seed):
    torch.manual_seed(seed)
    denoise, identity = unet_configs(TINY_UNET, conditioning)
    return RigFaceModel(denoise, identity, expression_dim=52, conditioning=conditioning).eval()


def inputs(h, w, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy_latents=torch.randn(batch, 4, h, w, generator=g),
        timesteps=torch.tensor([10, 700][:batch]),
        source_latents=torch.randn(batch, 4, h, w, generator=g),
        cond_latents=torch.randn(batch, 8, h, w, generator=g),
        expression=torch.randn(batch, 52, generator=g),
        text_embedding=torch.randn(1, 77, 32, generator=g),
    )


def naive_block_forward(block, identity_input):
    """The definition: norm1 over [x, id], full self-attention over 2N tokens (classic math processor),
    residual, keep the first N; cross-attention and feed-forward on N tokens."""
    math = AttnProcessor()

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
        n = hidden_states.shape[1]
        h = torch.cat([hidden_states, identity_input()], dim=1)
        h = (math(self.attn1, self.norm1(h)) + h)[:, :n]
        h = math(self.attn2, self.norm2(h), encoder_hidden_states=encoder_hidden_states) + h
        return self.ff(self.norm3(h)) + h

    return types.MethodType(forward, block)


def naive_output(model, x):
    """The whole Denoising UNet with every block replaced by the naive reference."""
    identity = model.encode_identity(x["source_latents"], x["text_embedding"])
    for name, block in transformer_blocks(model.unet_denoise):
        block.forward = naive_block_forward(block, lambda name=name: identity[name])
    try:
        # identity=None: the stock path, so only the patched blocks use the identity tokens.
        return model.denoise(x["noisy_latents"], x["timesteps"], None, x["cond_latents"], x["expression"],
                             x["text_embedding"])
    finally:
        for _, block in transformer_blocks(model.unet_denoise):
            del block.forward


@pytest.mark.parametrize("h,w", [(8, 8), (16, 16), (8, 16)])
def test_facefusion_equals_naive_concatenated_attention(h, w):
    model = make_model()
    x = inputs(h, w)
    with torch.no_grad():
        fused = model(**x)
        reference = naive_output(model, x)
        plain = model.denoise(x["noisy_latents"], x["timesteps"], None, x["cond_latents"], x["expression"],
                              x["text_embedding"])
    assert fused.shape == (2, 4, h, w)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    # And the identity actually matters: without it the output is far from the reference.
    assert (plain - reference).abs().max() > 1e-3


def test_block_level_equality_uses_denoising_norm1():
    model = make_model()
    (name, block), = [(n, b) for n, b in transformer_blocks(model.unet_denoise) if n.startswith("mid_block")]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, block.dim, generator=g) * 3 + 1
    ident = torch.randn(2, 16, block.dim, generator=g) * 0.5 - 2
    ctx = torch.randn(2, 77, 32, generator=g)
    saved = {k: v.clone() for k, v in block.norm1.state_dict().items()}
    with torch.no_grad():
        block.norm1.weight.normal_()  # a non-trivial norm, so using the wrong one would show
        block.norm1.bias.normal_()
        fused = block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"identity_tokens": {name: ident}})
        reference = naive_block_forward(block, lambda: ident)(x, encoder_hidden_states=ctx)
        id_block = model.unet_id.get_submodule(name)
        # Normalizing the identity with the identity block's own norm1 gives another result.
        wrong = block.attn1.processor.norm
        block.attn1.processor.norm = id_block.norm1
        other = block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"identity_tokens": {name: ident}})
        block.attn1.processor.norm = wrong
        block.norm1.load_state_dict(saved)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    assert (other - reference).abs().max() > 1e-3


def test_sixteen_identity_blocks_like_sd15():
    model = make_model()
    x = inputs(8, 8)
    with torch.no_grad():
        tokens = model.encode_identity(x["source_latents"], x["text_embedding"])
    assert model.num_identity_blocks == 16
    assert sorted(tokens) == sorted(model.identity_block_names())
    assert tokens["down_blocks.0.attentions.0.transformer_blocks.0"].shape == (2, 64, 32)


@pytest.mark.parametrize("conditioning", ["concat", "rigger"])
@pytest.mark.parametrize("path", ["source_latents", "expression", "cond_latents"])
def test_input_paths_are_live(conditioning, path):
    model = make_model(conditioning)
    x = inputs(8, 8)
    with torch.no_grad():
        base = model(**x)
        changed = dict(x)
        changed[path] = x[path] + torch.randn_like(x[path])
        out = model(**changed)
    assert (out - base).abs().max() > 1e-4, f"{path} does not reach the output"


def test_identity_tail_is_frozen_and_everything_else_gets_gradients():
    # DDP without find_unused_parameters needs every trainable parameter to receive a gradient.
    model = _build("rigger", 0).train()
    x = inputs(8, 8)
    model(**x).square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n, p in trainable if p.grad is None]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("unet_id.") for n in frozen)
    assert "unet_id.conv_out.weight" in frozen
