"""The `rigface` command: the one parser. Subcommands come from the ``rigface.commands`` entry-point group.

rigface's own commands live in rigface/commands/; the job commands (prepare, train, evaluate) live in
pipelines/commands/, above rigface, and plug in through the same group, so nothing here imports pipelines.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

from rigface import __version__
from rigface.config import ConfigError, load_config
from rigface.redact import install_log_redaction

log = logging.getLogger(__name__)

COMMAND_GROUP = "rigface.commands"
DISTRIBUTION = "rigface"
# Options every (sub)command accepts, before or after its name: `rigface train --config f.yaml` works too.
GLOBAL_LISTS = ("config", "overrides")


def command_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The subcommands: this project's own, then any other installed distribution's, first name wins.

    From a source checkout (an editable install, or PYTHONPATH) this project's list is read from its
    pyproject.toml: an editable install's metadata is a snapshot taken at install time and misses commands added
    since. An installed wheel has no pyproject.toml beside the package and uses its metadata.
    """
    own = _checkout_entry_points()
    found = list(own or [])
    for ep in importlib.metadata.entry_points(group=COMMAND_GROUP):
        dist = getattr(ep, "dist", None)
        if own is not None and dist is not None and dist.name == DISTRIBUTION:
            continue  # the checkout's own declaration replaces its (possibly stale) installed metadata
        found.append(ep)
    seen: set[str] = set()
    return [ep for ep in found if not (ep.name in seen or seen.add(ep.name))]


def _checkout_entry_points() -> list[importlib.metadata.EntryPoint] | None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+; on 3.10 the installed metadata is used
    except ImportError:
        return None
    if not pyproject.is_file():
        return None
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    if project.get("name") != DISTRIBUTION:
        return None
    group = project.get("entry-points", {}).get(COMMAND_GROUP, {})
    return [importlib.metadata.EntryPoint(name, value, COMMAND_GROUP) for name, value in group.items()]


def _add_global_options(parser: argparse.ArgumentParser, depth: int) -> None:
    """--config/--set/--log-level on ``parser``; below the top they get their own dests, merged by ``parse``."""
    sub = depth > 0
    suffix = f"_{depth}" if sub else ""
    default = argparse.SUPPRESS if sub else None
    parser.add_argument("--config", "-c", dest=f"config{suffix}", action="append",
                        default=default if sub else [], metavar="FILE",
                        help="YAML config file (repeatable; later files win)")
    parser.add_argument("--set", dest=f"overrides{suffix}", action="append", default=default if sub else [],
                        metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--log-level", dest=f"log_level{suffix}", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...",
                        default=default if sub else os.environ.get("RIGFACE_LOG_LEVEL", "WARNING"))


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]


def _add_global_options_below(parser: argparse.ArgumentParser, depth: int = 1) -> None:
    # Each nesting level writes its own dests: argparse copies a subparser's namespace over its parent's.
    for p in _subparsers(parser):
        _add_global_options(p, depth)
        _add_global_options_below(p, depth + 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rigface",
        description="RigFace at cluster scale: datasets from portrait videos, dual-UNet training, face edits.",
    )
    parser.add_argument("--version", action="version", version=f"rigface {__version__}")
    _add_global_options(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in command_entry_points():
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            module = ep.value.split(":")[0]
            if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
                raise
            log.debug("rigface %s: %s is not part of this build", ep.name, module)
            continue
        register(sub)
    _add_global_options_below(parser)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse, then merge the global options given at each level: lists in command-line order, the last log level."""
    args = (parser or build_parser()).parse_args(argv)
    found = vars(args)
    levels = sorted({int(k.rsplit("_", 1)[1]) for k in found if k.startswith(("config_", "overrides_", "log_level_"))})
    for depth in levels:
        for name in GLOBAL_LISTS:
            found[name] = found[name] + found.pop(f"{name}_{depth}", [])
        if f"log_level_{depth}" in found:
            found["log_level"] = found.pop(f"log_level_{depth}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # no URL password reaches a log line
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
