"""The `rigface` command. Each subcommand lives in rigface/commands/<name>.py and registers itself."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rigface import __version__
from rigface.commands import COMMANDS
from rigface.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rigface",
        description="RigFace at cluster scale: datasets from portrait videos, dual-UNet training, face edits.",
    )
    parser.add_argument("--version", action="version", version=f"rigface {__version__}")
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--log-level", default=os.environ.get("RIGFACE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rigface.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rigface.commands.{name}":
                raise
            continue  # a command whose module is not part of this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"rigface: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "needs_stack_env", True):
        from rigface.stack import apply_stack_env

        # The config's own endpoints first (an explicit choice), then the local stack's where none is set.
        cfg.storage.export_env()
        apply_stack_env(cfg.storage.state_dir)
    return int(args.func(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
