"""Sizes, Stable Diffusion folder init (tiny random weights in the real layout), released key map, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel

from model_media import write_released_folder, write_tiny_sd_folder
from rigface.config import RigFaceConfig
from rigface.model import CheckpointError, ModelConfig, RigFaceModel, build_rigface, load_released, map_released_key
from rigface.model.presets import SD15_UNET, SD15_VAE, unet_configs

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")




def test_sd15_sizes_on_meta_device():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
        denoise, identity = unet_configs(SD15_UNET, "concat")
        model = RigFaceModel(denoise, identity, expression_dim=64, conditioning="concat")
        vae = AutoencoderKL.from_config(SD15_VAE)
    per_unet = sum(p.numel() for p in unet.parameters())
    counts = model.parameter_counts()
    vae_params = sum(p.numel() for p in vae.parameters())
    assert round(per_unet / 1e6, 2) == 859.52
    assert counts["unet_id"] == per_unet
    assert counts["unet_denoise"] == per_unet + 8 * 320 * 3 * 3  # conv_in widened 4 -> 12 channels
    assert counts["expression_proj"] == 64 * 1280 + 1280
    assert round(vae_params / 1e6, 2) == 83.65
    assert abs((counts["total"] + vae_params) / 1e9 - 1.80) < 0.01
    assert model.num_identity_blocks == 16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("sd15"))


def test_init_from_stable_diffusion_folder(sd_folder):
    cfg = ModelConfig(preset="sd15", pretrained=str(sd_folder), conditioning="concat", resolution=64,
                      prediction_type="v_prediction")
    c = build_rigface(cfg)
    sd = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    sd_state = sd.state_dict()
    for key, value in c.model.unet_id.state_dict().items():
        assert torch.equal(value, sd_state[key]), key
    w = c.model.unet_denoise.conv_in.weight
    assert w.shape[1] == 12
    assert torch.equal(w[:, :4], sd_state["conv_in.weight"]) and not w[:, 4:].any()
    assert not c.model.expression_proj.weight.any()
    assert c.text_embedding.shape == (1, 77, 32)
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in c.vae.parameters())
    # Zero-initialized new inputs: the denoising UNet starts as the SD UNet on the noisy latent.
    g = torch.Generator().manual_seed(0)
    x, t, txt = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), c.text_embedding
    with torch.no_grad():
        ours = c.model.denoise(x, t, None, torch.randn(1, 8, 8, 8, generator=g), torch.randn(1, 52, generator=g), txt)
        theirs = sd(x, t, encoder_hidden_states=txt).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_prompt_changes_text_embedding(sd_folder):
    from rigface.model import encode_prompt

    a = encode_prompt(str(sd_folder), "A close up of a person.")
    b = encode_prompt(str(sd_folder), "A landscape.")
    assert a.shape == (1, 77, 32) and not torch.equal(a, b)


def test_released_key_map_loads_the_published_layout(sd_folder, tmp_path):
    """unet_denoise/checkpoint-N/ and unet_id/checkpoint-N/ as published: the newest loads unless one is named."""
    cfg = ModelConfig(preset="sd15", pretrained=str(sd_folder), expression_dim=64, resolution=64)
    model = build_rigface(cfg).model
    root = tmp_path / "released"
    newest = write_released_folder(root, model, seed=5, checkpoint="checkpoint-70000")
    older = write_released_folder(root, model, seed=6, checkpoint="checkpoint-9000")
    c = build_rigface(cfg.model_copy(update={"released": str(root)}))
    assert torch.equal(c.model.expression_proj.weight, newest["unet_denoise"]["au_aug_mlp.weight"])
    assert torch.equal(c.model.unet_denoise.conv_in.weight, newest["unet_denoise"]["conv_in.weight"])
    assert torch.equal(c.model.unet_id.conv_in.weight, newest["unet_id"]["conv_in.weight"])
    named = build_rigface(cfg.model_copy(update={"released": str(root), "released_checkpoint": "checkpoint-9000"}))
    assert torch.equal(named.model.expression_proj.bias, older["unet_denoise"]["au_aug_mlp.bias"])
    assert map_released_key("unet_id", "conv_in.weight") == "unet_id.conv_in.weight"
    assert map_released_key("unet_denoise", "au_aug_mlp.bias") == "expression_proj.bias"
    with pytest.raises(CheckpointError, match=r"no checkpoint-5/ .*checkpoint-70000, checkpoint-9000"):
        load_released(model, root, "checkpoint-5")


def test_released_mismatch_is_a_clear_error(tmp_path):
    model = build_rigface(ModelConfig(preset="tiny", expression_dim=64)).model
    write_released_folder(tmp_path / "released", model, seed=5, checkpoint=None)  # flat: part/*.safetensors
    load_released(model, tmp_path / "released")
    wrong_dim = build_rigface(ModelConfig(preset="tiny", expression_dim=52)).model
    with pytest.raises(CheckpointError, match="shape"):
        load_released(wrong_dim, tmp_path / "released")
    rigger = build_rigface(ModelConfig(preset="tiny", expression_dim=64, conditioning="rigger")).model
    with pytest.raises(CheckpointError, match="concat"):
        load_released(rigger, tmp_path / "released")
    (tmp_path / "empty" / "unet_denoise" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_released(model, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        load_released(model, tmp_path / "nowhere")


def test_released_without_pretrained_is_a_config_error():
    from rigface.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model\.released: .*needs model\.pretrained.*VAE and CLIP"):
        load_config([], ["model.released=s3://b/rigface"], environ={})
    cfg = load_config([], ["model.released=s3://b/rigface", "model.pretrained=s3://b/sd15"], environ={})
    assert cfg.model.released == "s3://b/rigface"
    with pytest.raises(ConfigError, match="released_checkpoint"):
        load_config([], ["model.released_checkpoint=70000"], environ={})


@pytest.mark.parametrize("name,preset,resolution", [("tiny", "tiny", 64), ("sd15", "sd15", 512)])
def test_model_config_files_validate(name, preset, resolution):
    data = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    cfg = RigFaceConfig.model_validate(data).model
    assert (cfg.preset, cfg.resolution) == (preset, resolution)
