"""One GPU, random weights of the true shapes: what training, editing and the face backends cost on the hardware.

Prints four tables (finishes in < 8 minutes on one H100-class GPU):
  training   samples/s of SD-1.5 RigFace at 512 px in bf16 (both UNets, gradient checkpointing), at the largest
             batch that fits, with the VAE encoding every step and with cached latents; ratio cache / VAE
  memory     measured peak per rank (1 rank: ddp; adamw vs adamw8bit), next to rigface.model.memory's estimate
  editing    latency of one edit at 50 UniPC steps (channels-last): fp32, bf16, bf16 batched, bf16 with the
             Denoising UNet compiled (default mode and CUDA graphs); ratios against fp32
  face       frames/s of the torch face backends on the GPU (BiSeNet 512, DECA 224, Deep3D 224), each built by
             its own loader from a random state dict of the true key names; SCRFD with --scrfd PACK (ONNX)

``--smoke`` runs the same code on the CPU with the tiny preset and small inputs in seconds (the unit test runs
it); no figure from it means anything. Run: .venv/bin/python bench/gpu.py [--smoke] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _gpu_step


@dataclass
class Setup:
    device: str
    preset: str
    resolution: int
    expression_dim: int
    batches: tuple[int, ...]  # tried largest first for "the largest batch that fits"
    steps: int  # timed training steps
    edit_steps: int
    face_sizes: dict
    face_batch: int
    face_iters: int
    warmup: int  # untimed first calls (allocator, cuDNN autotune)
    edit_batch: int = 8
    edit_runs: int = 3  # timed edits per row (median)


GPU = Setup("cuda", "sd15", 512, 64, (32, 24, 16, 12, 8, 4, 2, 1), 6, 50,
            {"bisenet": 512, "deca": 224, "deep3d": 224}, 16, 10, 2)
SMOKE = Setup("cpu", "tiny", 64, 8, (1,), 1, 1, {"bisenet": 64, "deca": 64, "deep3d": 64}, 1, 1, 0, 2, 1)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------- training


def train_rate(s: Setup, components, batch_size: int, cached: bool, optimizer: str = "adamw") -> tuple[float, float | None]:
    """(samples/s, peak GiB) of the training step at ``batch_size``: bf16 autocast on GPUs, fp32 on CPU."""
    import contextlib

    import torch

    from pipelines.train_strategy import make_optimizer
    from rigface.model.training import BATCH_LATENTS, training_step

    dev = s.device
    c = components
    opt = make_optimizer(c.model.trainable_parameters(), name=optimizer, lr=1e-5, weight_decay=0.0)
    h = s.resolution // 8
    if cached:
        batch = {k: torch.randn(batch_size, 4, h, h, device=dev) for k in BATCH_LATENTS}
        batch["latent_target_std"] = batch["latent_target_std"].abs() * 0.01
    else:
        batch = {k: torch.rand(batch_size, 3, s.resolution, s.resolution, device=dev) * 2 - 1
                 for k in ("source", "target", "render", "background")}
    batch["expression"] = torch.randn(batch_size, s.expression_dim, device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext()
    _peak_reset(dev)
    times = []
    try:
        for i in range(s.steps + s.warmup):
            _sync(dev)
            t0 = time.perf_counter()
            with autocast:
                loss = training_step(c, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            if i >= s.warmup:
                times.append(time.perf_counter() - t0)
        return batch_size / statistics.median(times), _peak_gib(dev)
    finally:
        del opt
        c.model.zero_grad(set_to_none=True)


def largest_batch(s: Setup, components, cached: bool) -> tuple[int, float, float | None]:
    """(batch, samples/s, peak GiB) at the largest batch of ``s.batches`` that runs without running out."""
    import torch

    for b in s.batches:
        try:
            rate, peak = train_rate(s, components, b, cached)
            return b, rate, peak
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            if s.device == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError("not even the smallest batch fits")


def training_rows(s: Setup, budget_end: float) -> tuple[list, list]:
    from rigface.model import ModelConfig, build_rigface

    c = build_rigface(ModelConfig(preset=s.preset, resolution=s.resolution, expression_dim=s.expression_dim))
    c = c.to(s.device)
    c.model.train()
    c.model.enable_gradient_checkpointing()
    b_vae, r_vae, p_vae = largest_batch(s, c, cached=False)
    b_lat, r_lat, p_lat = largest_batch(s, c, cached=True)
    gib = lambda p: f"{p:.1f} GiB" if p is not None else "n/a (no GPU)"  # noqa: E731
    train = [
        ("VAE every step", f"{r_vae:.1f} samples/s", f"batch {b_vae}", gib(p_vae), "1.00"),
        ("cached latents", f"{r_lat:.1f} samples/s", f"batch {b_lat}", gib(p_lat), f"{r_lat / r_vae:.2f}"),
    ]
    memory = []
    for opt in ("adamw", "adamw8bit"):
        if time.monotonic() > budget_end:
            memory.append((f"ddp x1, {opt}, ckpt, batch 4", "skipped (time budget)", "-"))
            continue
        try:
            _, peak = train_rate(s, c, min(4, s.batches[0]), cached=False, optimizer=opt)
            memory.append((f"ddp x1, {opt}, ckpt, batch {min(4, s.batches[0])}", gib(peak), "-"))
        except (RuntimeError, ImportError) as exc:
            memory.append((f"ddp x1, {opt}, ckpt", f"failed: {str(exc)[:60]}", "-"))
    return train, memory


def estimate_rows(s: Setup) -> str:
    from rigface.model import memory

    params, acts = memory.measure(s.preset, s.resolution, s.expression_dim)
    return memory.format_table(memory.table(params, acts, batch_size=4))


# ---------------------------------------------------------------- editing


def _edit_seconds(s: Setup, pipe, batch: int, runs: int) -> list[float]:
    """Wall seconds of ``runs`` whole edits (identity pass, N steps, VAE decode) of ``batch`` portraits."""
    import torch

    img = torch.rand(batch, 3, s.resolution, s.resolution) * 2 - 1
    exp = torch.randn(batch, s.expression_dim)
    times = []
    for _ in range(runs):
        _sync(s.device)
        t0 = time.perf_counter()
        pipe(source=img, background=img, render=img, expression=exp, num_inference_steps=s.edit_steps,
             generator=torch.Generator().manual_seed(0), output_type="pt")
        _sync(s.device)
        times.append(time.perf_counter() - t0)
    return times


def edit_latency(s: Setup, budget_end: float) -> list:
    """One edit's latency: fp32 (the authors' sampling) as the baseline, bf16, bf16 batched (per portrait) and
    bf16 with the Denoising UNet compiled (torch's default mode, and CUDA graphs); the first call of a compiled
    pipeline, which compiles, is reported apart."""
    import torch

    from rigface.model import ModelConfig, RigFacePipeline, build_rigface

    variants = [("fp32", torch.float32, 1, False), ("bf16", torch.bfloat16, 1, False)]
    if s.device == "cuda":  # most telling first: rows past the time budget are skipped
        variants += [("bf16 + compile reduce-overhead", torch.bfloat16, 1, "reduce-overhead")]
    variants += [("bf16", torch.bfloat16, s.edit_batch, False)]
    if s.device == "cuda":
        variants += [("bf16 + compile", torch.bfloat16, 1, True)]
    rows, base = [], None
    for name, dtype, batch, compile in variants:
        label = f"edit, {s.edit_steps} UniPC steps, {name}" + (f", batch {batch} (per portrait)" if batch > 1 else "")
        if base is not None and time.monotonic() > budget_end:
            rows.append((label, "skipped (time budget)", "-", "-"))
            continue
        c = build_rigface(ModelConfig(preset=s.preset, resolution=s.resolution, expression_dim=s.expression_dim))
        c = c.to(s.device, dtype)
        c.model.eval()
        pipe = RigFacePipeline.from_components(c).optimize_for_speed(channels_last=s.device == "cuda",
                                                                     compile=compile)
        try:
            first = _edit_seconds(s, pipe, batch, 1)[0]
            times = _edit_seconds(s, pipe, batch, max(s.warmup - 1, 0) + s.edit_runs)[-s.edit_runs:]
        except Exception as exc:  # a compile mode this torch cannot do is a row, not the end of the bench
            rows.append((label, f"failed: {type(exc).__name__}: {str(exc)[:60]}", "-", "-"))
            continue
        finally:
            del pipe, c
            if s.device == "cuda":
                torch.cuda.empty_cache()
        t = statistics.median(times) / batch
        base = base or t
        rows.append((label, f"{t:.3f} s", f"{first:.1f} s" if compile else "-", f"{t / base:.2f}"))
    return rows


# ---------------------------------------------------------------- face backends


def face_rows(s: Setup, scrfd: str | None) -> list:
    """frames/s of each torch backend, loaded by its own loader from a random state dict of the true keys."""
    import torch

    from rigface.face.backends.bisenet import BiSeNet, load_bisenet
    from rigface.face.backends.deca import DecaEncoder, load_deca_encoder
    from rigface.face.backends.deep3d import ReconNet, load_reconnet

    rows = []
    with tempfile.TemporaryDirectory(prefix="rigface-bench-") as d:
        nets = {}
        torch.save(BiSeNet().state_dict(), f"{d}/bisenet.pth")
        nets["bisenet"] = load_bisenet(f"{d}/bisenet.pth")
        torch.save({"E_flame": DecaEncoder().state_dict()}, f"{d}/deca_model.tar")
        nets["deca"] = load_deca_encoder(f"{d}/deca_model.tar")
        recon = ReconNet().state_dict()
        torch.save({"net_recon": recon}, f"{d}/epoch_20.pth")
        nets["deep3d"] = load_reconnet(f"{d}/epoch_20.pth")
    for name, net in nets.items():
        net = net.to(s.device).eval()
        if s.device == "cuda":
            net = net.to(memory_format=torch.channels_last)
        size = s.face_sizes[name]
        x = torch.rand(s.face_batch, 3, size, size, device=s.device)
        if s.device == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.inference_mode(), (torch.autocast("cuda", dtype=torch.float16) if s.device == "cuda"
                                      else torch.autocast("cpu", enabled=False)):
            for _ in range(s.warmup):
                net(x)
            _sync(s.device)
            t0 = time.perf_counter()
            for _ in range(s.face_iters):
                net(x)
            _sync(s.device)
        fps = s.face_batch * s.face_iters / (time.perf_counter() - t0)
        rows.append((f"{name} {size} px, batch {s.face_batch}", f"{fps:.0f} frames/s", "-"))
    if scrfd:
        rows.append(scrfd_row(s, scrfd))
    else:
        rows.append(("scrfd 640 px", "n/a (ONNX graph ships in the antelopev2 pack: --scrfd PACK)", "-"))
    return rows


def scrfd_row(s: Setup, pack: str) -> tuple:
    import numpy as np

    from rigface.face.backends.insightface import SCRFDDetector, pack_files

    det = SCRFDDetector(pack_files(pack, need_recogniser=False).detector, device=s.device)
    img = (np.random.default_rng(0).random((640, 640, 3)) * 255).astype(np.uint8)
    det.detect(img)
    t0 = time.perf_counter()
    for _ in range(s.face_iters * 4):
        det.detect(img)
    return ("scrfd 640 px (onnxruntime)", f"{s.face_iters * 4 / (time.perf_counter() - t0):.0f} frames/s", "-")


# ---------------------------------------------------------------- main


def print_table(title: str, header: tuple, rows: list) -> None:
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds (for the tests)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the optional rows after this many seconds")
    ap.add_argument("--scrfd", default=None, help="an antelopev2 pack folder, to time SCRFD on onnxruntime")
    ap.add_argument("--sections", default="train,edit,face", help="comma-separated: train, edit, face")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= {"train", "edit", "face"}:
        ap.error(f"unknown section in --sections {args.sections!r}")

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("n/a (no GPU): bench/gpu.py needs CUDA; `--smoke` runs its code on the CPU. CPU memory estimate:")
        print(estimate_rows(GPU))
        return 0
    s = SMOKE if args.smoke else GPU
    t0 = time.monotonic()
    end = t0 + args.budget_s
    print(f"device: {torch.cuda.get_device_name() if s.device == 'cuda' else 'cpu (smoke: figures mean nothing)'}")
    if "train" in sections:
        train, memory_rows = training_rows(s, end if not args.smoke else float("inf"))
        print_table(f"training, {s.preset} at {s.resolution} px, both UNets, gradient checkpointing, "
                    f"{'bf16' if s.device == 'cuda' else 'fp32'}",
                    ("measure", "rate", "batch", "peak", "ratio"), train)
        print_table("peak memory per rank, measured (1 rank)", ("configuration", "peak", "-"), memory_rows)
        print("\nestimated per rank (rigface.model.memory, GiB, batch 4):")
        print(estimate_rows(s))
    if "edit" in sections:
        print_table("editing: latency per portrait (median), the first call apart", ("measure", "latency",
                    "first call", "ratio"), edit_latency(s, end if not args.smoke else float("inf")))
    if "face" in sections:
        print_table("face backends", ("backend", "rate", "-"), face_rows(s, args.scrfd))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
