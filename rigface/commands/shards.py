"""`rigface shards validate URL`, `rigface shards preview URL --out grid.png [--sort F] [--where EXPR]` and
`rigface shards report URL --out DIR` (quality histograms, worst and best pairs)."""

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
    pv.add_argument("--sort", metavar="FIELD", help="order by a quality field (score, sharpness, face_size, "
                    "padded_fraction, landmark_confidence, pose_delta, ...); --sort=-FIELD for descending")
    pv.add_argument("--where", action="append", default=[], metavar="EXPR",
                    help="keep pairs whose quality passes, e.g. 'sharpness>=80' (repeatable)")
    pv.set_defaults(func=run)
    rp = sub.add_parser("report", help="histograms of the pair-quality fields and the worst and best pairs (PNG)")
    rp.add_argument("url")
    rp.add_argument("--out", required=True, help="folder or s3:// prefix for histograms.png, worst.png, best.png, "
                    "report.json")
    rp.add_argument("--by", default="score", help="quality field that ranks worst and best (default: score)")
    rp.add_argument("-n", type=int, default=8, help="pairs in each of worst.png and best.png")
    rp.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console

    from rigface.data import dataset, storage
    from rigface.data.shards import ShardError

    console = Console()
    limits = dataset.ReadLimits.from_config(cfg.reader)
    if args.shards_action == "validate":
        report = dataset.validate(args.url, limits)
        if args.json:
            print(json.dumps(report.to_dict(), indent=1))
        else:
            for fault in report.faults[:50]:
                console.print(f"[red]fault[/red] {fault}", markup=True, highlight=False)
            status = "[green]ok[/green]" if report.ok else f"[red]{len(report.faults)} fault(s)[/red]"
            console.print(f"{report.shards} shard(s), {report.samples} sample(s) {report.per_split}: {status}")
        return 0 if report.ok else 1
    from rigface.data.preview import preview_png, select_samples

    if args.shards_action == "report":
        from rigface.data.report import quality_report

        try:
            summary = quality_report(dataset.iter_samples(args.url, limits, decode=False), args.out, n=args.n,
                                     by=args.by)
        except (ValueError, ShardError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 1
        for name, st in summary["fields"].items():
            console.print(f"{name:<20} n={st['count']:<6} p10 {st['p10']:<10.4g} median {st['p50']:<10.4g} "
                          f"p90 {st['p90']:.4g}", highlight=False)
        console.print(f"{summary['samples']} pair(s); wrote {', '.join(summary['files'].values())} to {args.out}")
        return 0
    try:
        chosen = select_samples(dataset.iter_samples(args.url, limits, decode=False), rows=args.rows,
                                sort=args.sort, where=args.where)
        png = preview_png(chosen, rows=args.rows, tile=args.tile)
    except (ValueError, ShardError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    storage.write_bytes(args.out, png)
    console.print(f"wrote {args.out}")
    return 0
