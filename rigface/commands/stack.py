"""`rigface stack up | down | status | env`: the local S3 + MLflow servers."""

from __future__ import annotations

import argparse
import json
import time

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stack", help="start, stop or inspect the local S3 + MLflow servers")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run, needs_stack_env=False)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from rigface.stack import LocalStack, StackError

    console = Console(stderr=False)
    stack = LocalStack(cfg.storage.state_dir, cfg.storage.bucket)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            with console.status("starting S3 (SeaweedFS) and MLflow ..."):
                stack.up()
            if not args.json:
                console.print(f"stack up in {time.monotonic() - t0:.1f} s")
        elif args.action == "down":
            stopped = stack.down()
            console.print(f"stopped {len(stopped)} server(s); data kept in {stack.state}")
            return 0
        elif args.action == "env":
            # For `eval "$(rigface stack env)"`: export lines, including the generated local credentials. Every
            # value is shell-quoted, so whatever the state files hold, the shell only assigns it.
            print(stack.shell_env(), end="")
            return 0
    except StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    st = stack.status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["running"] else 1
    table = Table(title="rigface local stack", show_header=True)
    table.add_column("service")
    table.add_column("endpoint")
    table.add_column("pid")
    table.add_column("healthy")
    if "s3" in st:
        table.add_row("S3 (SeaweedFS)", f"{st['s3']['endpoint']}  bucket={st['s3']['bucket']}",
                      str(st["s3"]["pid"]), str(st["s3"]["healthy"]))
        table.add_row("MLflow", st["mlflow"]["uri"], str(st["mlflow"]["pid"]), str(st["mlflow"]["healthy"]))
    else:
        table.add_row("(none)", "not started: run `rigface stack up`", "-", "False")
    console.print(table)
    console.print(f"state: {st['state_dir']}  env file: {st.get('env_file', '-')}")
    if "mlflow" in st:
        console.print("MLflow login: user and password are MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                      "in the env file (`rigface stack env`)")
    return 0 if st["running"] else 1
