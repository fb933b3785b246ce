"""`rigface shards validate URL` and `rigface shards preview URL --out grid.png`."""

from __future__ import annotations

import argparse
import json

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shards", help="validate or preview WebDataset training shards")
    sub = p.add_subparsers(dest="shards_action", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="check every sample of every shard against the schema")
    v.add_argument("url", help="dataset URL (folder or s3:// prefix) or one .tar shard")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=run)
    pv = sub.add_parser("preview", help="draw a grid of pairs with their renders, masks and backgrounds")
    pv.add_argument("url")
    pv.add_argument("--out", required=True, help="PNG path or s3:// URL")
    pv.add_argument("--rows", type=int, default=8)
    pv.add_argument("--tile", type=int, default=128)
    pv.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console

    from rigface.data import shards, storage

    console = Console()
    if args.shards_action == "validate":
        report = shards.validate_shards(args.url)
        if args.json:
            print(json.dumps(report.to_dict(), indent=1))
        else:
            for fault in report.faults[:50]:
                console.print(f"[red]fault[/red] {fault}", markup=True, highlight=False)
            status = "[green]ok[/green]" if report.ok else f"[red]{len(report.faults)} fault(s)[/red]"
            console.print(f"{report.shards} shard(s), {report.samples} sample(s) {report.per_split}: {status}")
        return 0 if report.ok else 1
    from rigface.data.preview import preview_png

    try:
        png = preview_png(shards.iter_samples(args.url), rows=args.rows, tile=args.tile)
    except (ValueError, shards.ShardError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    storage.write_bytes(args.out, png)
    console.print(f"wrote {args.out}")
    return 0
