"""RigFacePipeline on a tiny model: sizes, input kinds, one identity pass, seeding; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rigface.model import ModelConfig, RigFacePipeline, build_rigface, load_rigface, save_rigface
from rigface.model.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def components():
    return build_rigface(ModelConfig(preset="tiny", resolution=64))


def uint8_images(b, size, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def test_pipeline_outputs_right_size_and_runs_identity_once(components):
    pipe = RigFacePipeline.from_components(components)
    calls = {"unet_denoise": 0, "unet_id": 0}
    hooks = [getattr(components.model, name).register_forward_hook(
        lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    try:
        src = uint8_images(3, 96, 0)  # not the model size: resized to 64
        out = pipe(src, uint8_images(3, 96, 1), uint8_images(3, 96, 2), np.zeros((3, 52), np.float32),
                   num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert out.images.shape == (3, 64, 64, 3) and out.images.dtype == np.uint8
    assert calls == {"unet_denoise": 3, "unet_id": 1}  # 1 + steps UNet evaluations for a batch of 3


def test_pipeline_input_kinds_and_seeding(components):
    pipe = RigFacePipeline.from_components(components)
    imgs = [Image.fromarray(a) for a in uint8_images(3, 64, 3)]
    exp = np.random.default_rng(0).standard_normal(52).astype(np.float32)
    pil = pipe(imgs[0], imgs[1], imgs[2], exp, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (64, 64)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1 for im in imgs]
    pt = pipe(*tensors, torch.from_numpy(exp)[None], num_inference_steps=2, output_type="pt",
              generator=torch.Generator().manual_seed(1))
    assert pt.images.shape == (1, 3, 64, 64) and 0 <= pt.images.min() and pt.images.max() <= 1
    again = pipe(*tensors, torch.from_numpy(exp)[None], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(1))
    other = pipe(*tensors, torch.from_numpy(exp)[None], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(2))
    assert torch.equal(pt.images, again.images) and not torch.equal(pt.images, other.images)
    with pytest.raises(ValueError, match="expression"):
        pipe(*tensors, torch.zeros(1, 64), num_inference_steps=1)


def test_save_load_round_trip(components, tmp_path):
    save_rigface(components, str(tmp_path / "m"))
    assert (tmp_path / "m" / "rigface.json").is_file()
    loaded = load_rigface(str(tmp_path / "m"))
    own, back = components.model.state_dict(), loaded.model.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    assert torch.equal(loaded.text_embedding, components.text_embedding)
    assert loaded.config == components.config
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 4, 8, 8, generator=g),
            torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 52, generator=g), components.text_embedding)
    with torch.no_grad():
        # Same weights; CPU kernels may pick other blockings for freshly loaded buffers, hence 1e-5 not bitwise.
        torch.testing.assert_close(loaded.model(*args), components.model(*args), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert not loaded.model.unet_id.conv_out.weight.requires_grad  # frozen identity tail survives loading


def test_load_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="not a RigFace model"):
        load_rigface(str(tmp_path))
