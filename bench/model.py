"""RigFace model benchmark: FaceFusion cost against the plain Denoising UNet, UNet evaluations per edit, GPU rows.

    .venv/bin/python bench/model.py [--repeats 5] [--threads 1]

CPU rows use the tiny preset (SD-1.5 block structure, narrow widths). 'saved MiB' is the memory autograd keeps
for the backward pass (the activation memory; on GPU the row also gives the CUDA peak). GPU rows (SD-1.5 sizes,
512 px, bf16) print 'n/a (no GPU)' without CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rigface.model import ModelConfig, RigFacePipeline, build_rigface
from rigface.model.facefusion import FaceFusionAttnProcessor, transformer_blocks


class NaiveConcatProcessor(FaceFusionAttnProcessor):
    """The definition, for comparison: full self-attention over [x, id] (2N queries), keep the first N."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 identity_tokens=None):
        if not self.fuse or identity_tokens is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, identity_tokens)
        n = hidden_states.shape[1]
        both = torch.cat([hidden_states, self.norm(identity_tokens[self.block_name])], dim=1)
        b, heads = both.shape[0], attn.heads
        q, k, v = (f(both).view(b, -1, heads, attn.to_q.out_features // heads).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.to_q.out_features)
        return attn.to_out[0](out)[:, :n]


def saved_bytes(fn) -> tuple[float, int]:
    """Run fn under a hook that sums the bytes autograd saves for backward; returns (result, bytes)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def time_fwd_bwd(model, args, identity, repeats, device):
    times, mem = [], 0
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out, mem = saved_bytes(lambda: model.denoise(args[0], args[1], identity, *args[2:]))
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem = max(mem, torch.cuda.max_memory_allocated())
        if i:  # first run is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem


def facefusion_rows(latent, repeats, device):
    c = build_rigface(ModelConfig(preset="tiny"))
    model = c.model.to(device).train()
    g = torch.Generator().manual_seed(0)
    b = 2
    args = [torch.randn(b, 4, latent, latent, generator=g).to(device), torch.tensor([10, 500], device=device),
            torch.randn(b, 8, latent, latent, generator=g).to(device), torch.randn(b, 52, generator=g).to(device),
            c.text_embedding.to(device)]
    with torch.no_grad():
        identity = model.encode_identity(torch.randn(b, 4, latent, latent, generator=g).to(device), args[-1])
    rows = {}
    rows["plain UNet (no FaceFusion)"] = time_fwd_bwd(model, args, None, repeats, device)
    rows["FaceFusion (this processor)"] = time_fwd_bwd(model, args, identity, repeats, device)
    procs = {}
    for name, block in transformer_blocks(model.unet_denoise):
        procs[name] = block.attn1.processor
        block.attn1.set_processor(NaiveConcatProcessor(name, norm=block.norm1))
    rows["naive concat 2N attention"] = time_fwd_bwd(model, args, identity, repeats, device)
    for name, block in transformer_blocks(model.unet_denoise):
        block.attn1.set_processor(procs[name])
    return rows


def evaluations_per_edit(steps):
    c = build_rigface(ModelConfig(preset="tiny"))
    pipe = RigFacePipeline.from_components(c)
    count = {"n": 0}
    hooks = [getattr(c.model, p).register_forward_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
             for p in ("unet_denoise", "unet_id")]
    img = torch.zeros(1, 3, 64, 64)
    pipe(img, img, img, torch.zeros(1, 52), num_inference_steps=steps, output_type="pt")
    for h in hooks:
        h.remove()
    return count["n"]


def gpu_rows():
    if not torch.cuda.is_available():
        return {"SD-1.5 train step, 512 px bf16 (samples/s)": "n/a (no GPU)",
                "SD-1.5 edit, 50 UniPC steps (s/image)": "n/a (no GPU)"}
    from _gpu_step import sd15_train_samples_per_s  # bench/ is on sys.path when run as a script

    b = 4
    samples_per_s, c = sd15_train_samples_per_s(batch_size=b)
    c.to(dtype=torch.float16)
    pipe = RigFacePipeline.from_components(c)
    img = torch.zeros(1, 3, 512, 512)
    lat = []
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(img, img, img, torch.zeros(1, 64), num_inference_steps=50, output_type="pt")
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t0)
    return {"SD-1.5 train step, 512 px bf16 (samples/s)": f"{samples_per_s:.2f} (batch {b}, grad ckpt)",
            "SD-1.5 edit, 50 UniPC steps (s/image)": f"{min(lat[1:]):.3f} (fp16)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latents", type=int, nargs="+", default=[8, 16, 32])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    print(f"Denoising UNet forward+backward, tiny preset, batch 2, CPU x{a.threads} thread(s), median of {a.repeats}")
    print(f"{'latent':>7} {'variant':<30} {'ms':>9} {'x plain':>8} {'saved MiB':>10} {'x plain':>8}")
    for latent in a.latents:
        rows = facefusion_rows(latent, a.repeats, cpu)
        t0, m0 = rows["plain UNet (no FaceFusion)"]
        for name, (t, m) in rows.items():
            print(f"{latent:>4}x{latent:<2} {name:<30} {t * 1e3:>9.1f} {t / t0:>8.2f} {m / 2**20:>10.1f} {m / m0:>8.2f}")
    print()
    print(f"{'edit steps':>10} {'UNet evaluations':>17} {'expected 1+steps':>17}")
    for steps in (10, 50):
        n = evaluations_per_edit(steps)
        print(f"{steps:>10} {n:>17} {1 + steps:>17}")
    print()
    for name, value in gpu_rows().items():
        print(f"{name:<45} {value}")


if __name__ == "__main__":
    main()
