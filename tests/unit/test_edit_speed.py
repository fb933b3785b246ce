"""Editing at the hardware's pace: batched edits equal single ones, channels-last changes nothing but the layout,
the compile flag reaches the Denoising UNet, and every attention is scaled-dot-product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

DIM = 8


@pytest.fixture(scope="module")
def components():
    from rigface.model import ModelConfig, build_rigface

    c = build_rigface(ModelConfig(preset="tiny", resolution=64, expression_dim=DIM))
    c.model.eval()
    return c


def _inputs(n):
    g = torch.Generator().manual_seed(5)
    imgs = {k: torch.rand(n, 3, 64, 64, generator=g) * 2 - 1 for k in ("source", "background", "render")}
    return imgs, torch.randn(n, DIM, generator=g)


def _run(pipe, imgs, exp, seeds):
    out = pipe(**imgs, expression=exp, num_inference_steps=2, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds])
    return out.images


def test_a_batch_of_edits_equals_the_edits_alone(components, one_thread):
    from rigface.model import RigFacePipeline

    pipe = RigFacePipeline.from_components(components)
    imgs, exp = _inputs(2)
    batch = _run(pipe, imgs, exp, [0, 0])
    for i in range(2):
        alone = _run(pipe, {k: v[i:i + 1] for k, v in imgs.items()}, exp[i:i + 1], [0])
        assert torch.allclose(batch[i:i + 1], alone, atol=2e-5), (batch[i:i + 1] - alone).abs().max()
    assert not torch.allclose(batch[0], batch[1])  # different inputs give different edits


def test_channels_last_changes_the_layout_not_the_edit(components, one_thread):
    from rigface.model import RigFacePipeline

    imgs, exp = _inputs(1)
    plain = _run(RigFacePipeline.from_components(components), imgs, exp, [1])
    import copy

    fast_components = copy.deepcopy(components)
    pipe = RigFacePipeline.from_components(fast_components).optimize_for_speed(channels_last=True)
    conv = pipe.model.unet_denoise.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.allclose(_run(pipe, imgs, exp, [1]), plain, atol=1e-4)


def test_compile_flag_compiles_the_denoising_unet_in_place(components):
    import copy

    from rigface.model import RigFacePipeline

    c = copy.deepcopy(components)
    keys = set(c.model.state_dict())
    pipe = RigFacePipeline.from_components(c).optimize_for_speed(channels_last=False, compile=True)
    assert pipe.model.unet_denoise._compiled_call_impl is not None  # nn.Module.compile: called on next forward
    assert pipe.model.unet_id._compiled_call_impl is None  # runs once per edit: not worth compiling
    assert set(pipe.model.state_dict()) == keys  # saved checkpoints keep their key names


@pytest.mark.parametrize("setting, mode", [(True, None), ("reduce-overhead", "reduce-overhead")])
def test_compile_setting_chooses_the_torch_compile_mode(components, monkeypatch, setting, mode):
    """`evaluate.compile: reduce-overhead` (CUDA graphs: 0.57 s vs 2.24 s per bf16 edit on an H200) reaches
    torch.compile as its mode; `true` keeps torch's default."""
    import copy

    from rigface.config import RigFaceConfig
    from rigface.model import RigFacePipeline

    assert RigFaceConfig.model_validate({"evaluate": {"compile": setting}}).evaluate.compile == setting
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update(kw))
    RigFacePipeline.from_components(copy.deepcopy(components)).optimize_for_speed(channels_last=False,
                                                                                 compile=setting)
    assert seen == {"fullgraph": False, "dynamic": False, "mode": mode}


def test_compile_setting_refuses_an_unknown_mode():
    from pydantic import ValidationError

    from rigface.config import RigFaceConfig

    with pytest.raises(ValidationError):
        RigFaceConfig.model_validate({"evaluate": {"compile": "fastest"}})


def test_every_attention_is_scaled_dot_product(components):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from rigface.model.facefusion import FaceFusionAttnProcessor

    denoise = set(map(type, components.model.unet_denoise.attn_processors.values()))
    identity = set(map(type, components.model.unet_id.attn_processors.values()))
    assert denoise == {FaceFusionAttnProcessor} and identity == {AttnProcessor2_0}
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1]
    try:
        imgs, exp = _inputs(1)
        from rigface.model import RigFacePipeline

        _run(RigFacePipeline.from_components(components), imgs, exp, [0])
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    # 2 attentions per transformer block (self + cross) x 16 blocks: the identity pass once, 2 denoising steps;
    # plus the VAE's mid-block attention in one encode (all three images at once) and one decode
    assert len(calls) == 32 * 3 + 2


def test_editor_edits_several_drivers_in_one_batch_like_one_by_one(one_thread):
    from face_media import astronaut, grace_hopper

    from rigface.config import load_config
    from rigface.edit import EditError, PortraitEditor
    from rigface.model import RigFacePipeline, build_rigface

    cfg = load_config([], ["model.preset=tiny", "model.resolution=64", "evaluate.num_inference_steps=2",
                           "evaluate.batch_size=4"])  # the embedded face backend's 52 blendshapes
    editor = PortraitEditor(RigFacePipeline.from_components(build_rigface(cfg.model)), cfg)
    src, drivers = astronaut(), [grace_hopper(), np.ascontiguousarray(grace_hopper()[:, ::-1])]
    many = editor.edit_many([src], drivers, edit="pose", seed=3)
    assert len(many) == 2 and many[0].image.shape == src.shape
    one = editor.edit(src, drivers[1], edit="pose", seed=3)
    # Same edit alone (a batch of one): equal up to float rounding, which the random tiny model and the 64 -> 512
    # px resize amplify at a few pixels; a different noise or condition would change most of the head region.
    diff = np.abs(many[1].image.astype(int) - one.image.astype(int))
    assert diff.mean() < 0.2 and np.mean(diff > 2) < 0.01, (diff.mean(), np.mean(diff > 2))
    other = np.abs(many[0].image.astype(int) - one.image.astype(int))
    assert other.mean() > 5 * max(diff.mean(), 0.01)  # the other driver's edit is visibly different
    with pytest.raises(EditError, match="one source or as many"):
        editor.edit_many([src, src], drivers * 2, edit="pose")
