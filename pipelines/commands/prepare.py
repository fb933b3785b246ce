"""`rigface prepare`: build WebDataset training shards from portrait videos with Ray Data."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="build training shards from portrait videos (Ray Data)")
    p.add_argument("--source", action="append", default=None,
                   help="folder, s3:// prefix or manifest (.csv/.jsonl/.parquet); repeatable")
    p.add_argument("--output", help="dataset URL: a folder or s3://bucket/prefix")
    p.add_argument("--pairs-per-video", type=int)
    p.add_argument("--min-gap-seconds", type=float)
    p.add_argument("--shard-size", type=int)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="delete the dataset at --output and start again")
    mode.add_argument("--append", action="store_true", help="add a new source as a new dataset version")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from rigface.data.sources import SourceError

    console = Console()
    updates = {k: v for k, v in {"pairs_per_video": args.pairs_per_video, "min_gap_seconds": args.min_gap_seconds,
                                  "shard_size": args.shard_size}.items() if v is not None}
    if updates:
        cfg = cfg.model_copy(update={"prepare": cfg.prepare.model_copy(update=updates)})
        type(cfg.prepare).model_validate(cfg.prepare.model_dump())  # re-check the ranges
    from pipelines.prepare import PrepareError, run_prepare  # Ray loads only here

    try:
        s = run_prepare(cfg, source=args.source or cfg.prepare.source, output=args.output or cfg.prepare.output,
                        overwrite=args.overwrite, append=args.append)
    except (PrepareError, SourceError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    table = Table(title=f"rigface prepare -> {s.output} (version {s.version})")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("videos listed", s.videos_listed), ("duplicates skipped", s.videos_duplicate),
            ("videos with pairs", s.videos_ok), ("pairs (samples)", s.pairs), ("per split", s.per_split),
            ("shards written / resumed", f"{s.shards_written} / {s.shards_resumed}"),
            ("frames analyzed", s.frames_analyzed), ("video skips", s.video_skips), ("frame skips", s.frame_skips),
            ("seconds", f"{s.seconds:.1f}"), ("content hash", s.content_hash[:16])]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    return 0
