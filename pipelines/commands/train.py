"""`rigface train`: fine-tune RigFace with Ray Train on shards made by `rigface prepare`."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune the dual UNet with Ray Train (checkpoints on S3, MLflow)")
    p.add_argument("--data", default=None, help="dataset URL holding the shards (default: train.data)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps in total (default: train.max_steps)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: train.num_workers)")
    p.add_argument("--run-name", default=None,
                   help="run name (default: train.run_name); rerunning a name resumes its latest checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    for flag in ("max_steps", "num_workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            console.print(f"[red]error:[/red] --{flag.replace('_', '-')} must be >= 1 (got {value})")
            return 2
    from pipelines.train import TrainError, TrainInterrupted, run_train  # Ray and torch load only now

    try:
        result = run_train(cfg, data=args.data, run_name=args.run_name, max_steps=args.max_steps,
                           num_workers=args.num_workers)
    except TrainError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except TrainInterrupted as exc:
        console.print(f"[yellow]stopped:[/yellow] {exc}")
        return 130
    console.print(f"run {result.run_name}: {'resumed, ' if result.resumed else ''}step {result.steps}")
    console.print(f"  mlflow run: {result.mlflow_run_id}")
    console.print(f"  checkpoint: {result.checkpoint_uri}")
    if result.model_uri:
        console.print(f"  model: {result.model_uri}")
    return 0
