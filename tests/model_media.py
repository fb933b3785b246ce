"""Model folders with tiny random weights in the real layouts, for tests (no hub, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from rigface.model.presets import SD15_SCHEDULER, TINY_UNET, TINY_VAE


def _tiny_clip(folder: Path):
    """A CLIP tokenizer (byte-level vocab, no merges) and a tiny random text encoder, in diffusers layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256 + n.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                           bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1))
    encoder.save_pretrained(folder / "text_encoder")


def write_tiny_sd_folder(root: Path) -> Path:
    """Stable Diffusion 1.5 layout with tiny random weights: unet, vae, scheduler, tokenizer, text_encoder."""
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_UNET).save_pretrained(root / "unet")
    AutoencoderKL.from_config(TINY_VAE).save_pretrained(root / "vae")
    DDPMScheduler.from_config(SD15_SCHEDULER).save_pretrained(root / "scheduler")
    _tiny_clip(root)
    return root


def write_released_folder(root: Path, model, seed: int, checkpoint: str | None = "checkpoint-70000") -> dict:
    """The authors' release layout with random weights of ``model``'s shapes: ``unet_denoise/`` and ``unet_id/``,
    each a diffusers UNet (today's key names are diffusers 0.22's) plus ``au_aug_mlp.*`` in unet_denoise, under
    ``checkpoint-N/`` as published (or directly in the part folder when ``checkpoint`` is None). Returns the
    tensors written, per part."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    for part in ("unet_denoise", "unet_id"):
        unet = getattr(model, part)
        state = {k: torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}
        if part == "unet_denoise":
            state["au_aug_mlp.weight"] = torch.randn(model.expression_proj.weight.shape, generator=g)
            state["au_aug_mlp.bias"] = torch.randn(model.expression_proj.bias.shape, generator=g)
        folder = root / part / checkpoint if checkpoint else root / part
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                        "_diffusers_version": "0.22.0", **unet.config}))
        written[part] = state
    return written
