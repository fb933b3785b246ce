"""`rigface weights check DIR_OR_S3`: which of the paper's weight files are there, in what shape, for which job."""

from __future__ import annotations

import argparse
import json

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="inspect user-supplied weight files before launching a job")
    sub = p.add_subparsers(dest="weights_action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="which of the paper's files a folder or s3:// prefix holds, and what can run")
    c.add_argument("root", help="folder or s3:// prefix holding the weights (searched recursively by file name)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from rigface.weights import check_weights

    report = check_weights(args.root)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.ok else 1
    console = Console(width=160)
    table = Table(title=f"weights under {report.root}")
    for col in ("file", "status", "format", "keys / shapes", "where"):
        table.add_column(col, overflow="fold")
    colour = {"ok": "green", "missing": "yellow", "bad": "red"}
    for i in report.items:
        detail = "; ".join([*i.problems, i.detail]) if i.problems else i.detail
        where = "" if i.path is None else i.path[len(report.root):].lstrip("/") or "."
        table.add_row(f"{i.name}\n[dim]{i.what}[/dim]", f"[{colour[i.status]}]{i.status}[/]", i.format, detail, where)
    console.print(table)
    jobs = Table(title="what can run")
    jobs.add_column("job")
    jobs.add_column("ready")
    jobs.add_column("lacks", overflow="fold")
    for job, lacks in report.jobs.items():
        jobs.add_row(job, "[green]yes[/]" if not lacks else "[yellow]no[/]", ", ".join(lacks))
    console.print(jobs)
    if report.overrides:
        console.print("config: " + " ".join(f"--set {o}" for o in report.overrides), highlight=False)
    return 0 if report.ok else 1
