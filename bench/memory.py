"""Peak GPU memory per training rank for SD-1.5 RigFace at 512 px, estimated on the CPU (no GPU, no weights).

Parameter counts and activation sizes are measured on meta tensors of SD-1.5's true shapes (one training step,
autograd's saved tensors summed; see rigface.model.memory for what each column holds). Prints one table per batch
size and the configurations that fit a 24 GB GPU. bench/gpu.py measures the real peak where a GPU exists.

Run: .venv/bin/python bench/memory.py [--batch 4 2] [--gib 24]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--gib", type=float, default=24.0)
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()

    from rigface.model import memory

    t0 = time.perf_counter()
    params, acts = memory.measure(args.preset, args.resolution, expression_dim=64)
    print(f"{args.preset} at {args.resolution} px: {params.model / 1e9:.3f} B model parameters "
          f"({params.trainable / 1e9:.3f} B trainable, Identity Encoder {params.unet_id / 1e6:.1f} M, "
          f"largest block {params.largest_unit / 1e6:.1f} M), VAE {params.vae / 1e6:.1f} M")
    print(f"saved activations per sample (fp32, fused attention): {acts.full / 2**30:.2f} GiB; with gradient "
          f"checkpointing {acts.checkpointed / 2**30:.2f} GiB kept + {acts.largest_region / 2**30:.2f} GiB "
          f"largest recomputed block  [measured in {time.perf_counter() - t0:.0f} s on meta tensors]")
    for b in args.batch:
        rows = memory.table(params, acts, batch_size=b)
        print(f"\nper-rank peak, GiB, batch {b} per rank, bf16 autocast:")
        print(memory.format_table(rows, gib=args.gib))
        fits = [f"{e.strategy} x{e.world} {e.optimizer}{' +ckpt' if e.gradient_checkpointing else ''}"
                for e in rows if e.fits(args.gib)]
        print(f"fits {args.gib:g} GB: {', '.join(fits) or 'none'}")


if __name__ == "__main__":
    main()
