"""The SD-1.5-size training step on one GPU, shared by bench/model.py and bench/train.py (not a benchmark itself)."""

from __future__ import annotations

import statistics
import time


def sd15_train_samples_per_s(batch_size: int = 4, steps: int = 8, expression_dim: int = 64):
    """(samples/s at 512 px bf16 with gradient checkpointing, the components) — call only where CUDA exists."""
    import torch

    from rigface.model import ModelConfig, build_rigface, training_step

    dev = torch.device("cuda")
    c = build_rigface(ModelConfig(preset="sd15", resolution=512, expression_dim=expression_dim)).to(dev)
    c.model.train()
    c.model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(c.model.trainable_parameters(), lr=1e-5)
    batch = {k: torch.rand(batch_size, 3, 512, 512, device=dev) * 2 - 1
             for k in ("source", "target", "render", "background")}
    batch["expression"] = torch.randn(batch_size, expression_dim, device=dev)
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = training_step(c, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:  # warm-up: allocator, cuDNN autotune
            times.append(time.perf_counter() - t0)
    del opt
    return batch_size / statistics.median(times), c
