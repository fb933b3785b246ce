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


def authors_schedule(steps: int) -> tuple[list[int], float]:
    """The authors' timesteps and last sigma, computed from first principles (not with diffusers): diffusers 0.22
    UniPC from SD-1.5's config spaced steps by linspace over [0, 999] and ended at sigma(t=0) of the scaled-linear
    betas, sqrt(beta_0 / (1 - beta_0))."""
    timesteps = np.linspace(0, 999, steps + 1).round()[::-1][:-1].astype(int).tolist()
    beta0 = 0.00085  # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2, so beta_0 = 0.00085
    return timesteps, float(np.sqrt(beta0 / (1 - beta0)))


def timesteps_seen(pipe, steps: int) -> list[int]:
    """The timesteps the denoising UNet is actually called with during one edit."""
    seen = []
    hook = pipe.model.unet_denoise.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(int(args[1].flatten()[0])), with_kwargs=True)
    try:
        pipe(*uint8_images(3, 64, 7)[:, None], np.zeros((1, 52), np.float32), num_inference_steps=steps,
             output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return seen


def test_fresh_and_loaded_pipelines_run_the_authors_schedule(components, tmp_path):
    expected, last_sigma = authors_schedule(50)
    assert expected[:3] == [999, 979, 959] and expected[-1] == 20 and abs(last_sigma - 0.0292) < 1e-4
    fresh = RigFacePipeline.from_components(components)
    save_rigface(components, str(tmp_path / "m"))
    loaded = load_rigface(str(tmp_path / "m"))
    for pipe in (fresh, loaded):
        pipe.scheduler.set_timesteps(50)
        assert pipe.scheduler.timesteps.tolist() == expected
        assert abs(float(pipe.scheduler.sigmas[-1]) - last_sigma) < 1e-6
        assert float(pipe.scheduler.sigmas[-2]) > last_sigma  # the schedule really ends there, not at 0
    assert timesteps_seen(loaded, 50) == expected
    # The saved folder holds the sampler itself: its config comes back unchanged.
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(fresh.scheduler.config)


def test_other_schedulers_and_step_counts_stay_configurable(components, tmp_path):
    from diffusers import DDIMScheduler

    save_rigface(components, str(tmp_path / "m"))
    ddim = load_rigface(str(tmp_path / "m"), scheduler="DDIMScheduler")
    assert isinstance(ddim.scheduler, DDIMScheduler)
    assert ddim.scheduler.config.num_train_timesteps == 1000 and ddim.scheduler.config.beta_schedule == "scaled_linear"
    assert timesteps_seen(RigFacePipeline.from_components(components), 4) == authors_schedule(4)[0]
    mine = DDIMScheduler.from_config(components.noise_scheduler.config, timestep_spacing="trailing")
    assert isinstance(RigFacePipeline.from_components(components, scheduler=mine).scheduler, DDIMScheduler)
    with pytest.raises(CheckpointError, match="not a diffusers scheduler"):
        load_rigface(str(tmp_path / "m"), scheduler="NoSuchScheduler")


def test_save_load_round_trip(components, tmp_path):
    save_rigface(components, str(tmp_path / "m"))
    saved = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert saved == ["model", "model_index.json", "scheduler", "text_embedding", "vae"]  # diffusers' own format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the staging folder is gone
    loaded = load_rigface(str(tmp_path / "m"))
    own, back = components.model.state_dict(), loaded.model.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    assert torch.equal(loaded.text_embedding.embedding, components.text_embedding)
    assert loaded.text_embedding.config.prompt == components.config.prompt
    assert loaded.resolution == components.config.resolution == 64
    assert loaded.model.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 4, 8, 8, generator=g),
            torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 52, generator=g), components.text_embedding)
    with torch.no_grad():
        # Same weights; CPU kernels may pick other blockings for freshly loaded buffers, hence 1e-5 not bitwise.
        torch.testing.assert_close(loaded.model(*args), components.model(*args), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert not loaded.text_embedding.embedding.requires_grad
    assert not loaded.model.unet_id.conv_out.weight.requires_grad  # frozen identity tail survives loading
    # Saving over an existing model replaces it whole.
    save_rigface(loaded, str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == saved


def test_load_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="not a RigFace model"):
        load_rigface(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        load_rigface(str(tmp_path / "nothing"))


@pytest.mark.parametrize("sets,dtype,scheduler", [([], torch.float32, "UniPCMultistepScheduler"),
                                                  (["evaluate.precision=bf16", "evaluate.scheduler=DDIMScheduler"],
                                                   torch.bfloat16, "DDIMScheduler")])
def test_editor_runs_fp32_and_the_saved_sampler_unless_the_config_opts_out(components, tmp_path, sets, dtype,
                                                                           scheduler):
    from rigface.config import load_config
    from rigface.edit import PortraitEditor

    save_rigface(components, str(tmp_path / "m"))
    cfg = load_config([], sets, environ={})
    editor = PortraitEditor.load(str(tmp_path / "m"), cfg, device="cpu", analyzer=object())  # no face work here
    assert editor.pipeline.model.dtype == dtype and editor.pipeline.vae.dtype == dtype
    assert type(editor.pipeline.scheduler).__name__ == scheduler
