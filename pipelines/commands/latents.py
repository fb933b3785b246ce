"""`rigface latents`: precompute the frozen VAE's latents beside each shard, so training skips the VAE."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("latents", help="write the VAE latents of every shard beside it (Ray Data)")
    p.add_argument("--data", default=None, help="dataset URL holding the shards (default: latents.data, train.data)")
    p.add_argument("--overwrite", action="store_true", help="re-encode shards that already have a sidecar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if args.overwrite:
        cfg = cfg.model_copy(update={"latents": cfg.latents.model_copy(update={"overwrite": True})})
    from pipelines.latents import LatentsError, run_latents  # Ray and torch load only now

    try:
        r = run_latents(cfg, data=args.data)
    except LatentsError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(f"latents {r.tag}: {r.written} shard(s) written, {r.skipped_done} already done, "
                  f"{len(r.failed)} failed; {r.samples} samples in {r.seconds:.1f} s")
    for line in r.failed:
        console.print(f"  [red]failed:[/red] {line}")
    return 1 if r.failed else 0
