"""The one `rigface` parser: every subcommand found through the entry-point group, global options on either side of
the subcommand."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rigface.cli import COMMAND_GROUP, build_parser, command_entry_points, main, parse_args
from rigface.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMAND_GROUP]


def test_every_declared_command_is_registered_in_order():
    declared = _declared()
    assert {"prepare", "train", "evaluate"} <= set(declared) and {"stack", "shards", "edit"} <= set(declared)
    assert [ep.name for ep in command_entry_points()][: len(declared)] == list(declared)
    choices = build_parser()._subparsers._group_actions[0].choices
    assert list(choices)[: len(declared)] == list(declared)
    # The job commands live above rigface; rigface's own below it.
    assert all(v.startswith("pipelines.commands.") for k, v in declared.items() if k in ("prepare", "train", "evaluate"))


def test_global_options_after_the_subcommand(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {lr: 0.1, max_steps: 5}\n")
    b.write_text("train: {lr: 0.2}\n")
    before = parse_args(["--config", str(a), "--config", str(b), "--set", "train.batch_size=3", "train"])
    after = parse_args(["train", "--config", str(a), "--max-steps", "7", "--config", str(b),
                        "--set", "train.batch_size=3", "--log-level", "INFO"])
    mixed = parse_args(["--config", str(a), "train", "--config", str(b), "--set", "train.batch_size=3"])
    for args in (before, after, mixed):
        assert args.config == [str(a), str(b)] and args.overrides == ["train.batch_size=3"]
        cfg = load_config(args.config, args.overrides)
        assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (0.2, 5, 3)
    assert after.max_steps == 7 and after.log_level == "INFO" and before.log_level == "WARNING"
    assert not [k for k in vars(after) if k.rsplit("_", 1)[-1].isdigit()]  # per-level dests merged away


def test_global_options_after_a_nested_subcommand(tmp_path):
    args = parse_args(["-c", "a.yaml", "shards", "--set", "x.y=1", "validate", "s3://b/d", "--config", "c.yaml"])
    assert (args.shards_action, args.url) == ("validate", "s3://b/d")
    assert args.config == ["a.yaml", "c.yaml"] and args.overrides == ["x.y=1"]


def test_a_bad_value_after_the_subcommand_fails_before_any_work(capsys):
    assert main(["train", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_the_console_entry_runs_a_job_command_from_a_fresh_interpreter(tmp_path):
    """`python -m rigface train --help` from the checkout: the job commands are found without installed metadata
    of this tree (the shared venv's editable install may predate them)."""
    out = subprocess.run([sys.executable, "-m", "rigface", "train", "--config", "x.yaml", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--num-workers" in out.stdout and "--config" in out.stdout


@pytest.mark.parametrize("name", ["prepare", "train", "evaluate", "stack", "shards", "edit"])
def test_each_entry_point_loads_a_register_function(name):
    ep = next(ep for ep in command_entry_points() if ep.name == name)
    assert callable(ep.load())
