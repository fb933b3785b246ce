"""`rigface evaluate`: edit the validation split with a trained model and write the Table-1 report."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="score a model on the validation split (ID, SSIM, LPIPS, FID, APD/AED/ALD)")
    p.add_argument("--data", default=None, help="dataset URL (folder or s3:// prefix holding val/ shards), or one .tar")
    p.add_argument("--model", default=None,
                   help="trained model: folder, s3:// URI, or MLflow URI (models:/name/version, runs:/id/path)")
    p.add_argument("--out", default=None, help="report folder (local or s3://): report.md, report.json, per_pair.jsonl")
    p.add_argument("--run-id", default=None, help="MLflow run to log the metrics and report to")
    p.add_argument("--max-samples", type=int, default=None, help="score at most N pairs")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: evaluate.num_inference_steps)")
    p.add_argument("--actors", type=int, default=None,
                   help="editing actors, one GPU each where GPUs exist (default: evaluate.num_actors)")
    p.add_argument("--save-images", action="store_true", help="also write the edited crops under OUT/edited/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    ev = cfg.evaluate
    data, model, out = args.data or ev.data, args.model or ev.model, args.out or ev.out
    missing = [n for n, v in (("--data", data), ("--model", model), ("--out", out)) if not v]
    if missing:
        console.print(f"[red]error:[/red] missing {', '.join(missing)} (or evaluate.* in the config)")
        return 2
    if args.max_samples is not None and args.max_samples < 1:
        console.print("[red]error:[/red] --max-samples must be >= 1")
        return 2
    # Ray, torch and the metric networks load only here, so `rigface --help` stays fast.
    from pipelines.evaluate import EvaluateError, run_evaluate
    from rigface.eval.fid import FIDError
    from rigface.eval.lpips_net import LPIPSWeightsError

    try:
        with console.status("editing and scoring the validation split ..."):
            report = run_evaluate(cfg, data=data, model=model, out=out,
                                  mlflow_run_id=args.run_id or ev.mlflow_run_id, max_samples=args.max_samples,
                                  steps=args.steps, num_actors=args.actors, save_images=args.save_images)
    except (EvaluateError, FIDError, LPIPSWeightsError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    print(report.to_markdown())
    console.print(f"wrote {out}/report.md and report.json")
    return 0
