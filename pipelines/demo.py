"""`make demo`: the whole RigFace loop on one machine, in minutes, with nothing to download.

    python -m pipelines.demo [--quick] [--out demo_out] [--config FILE] [--set section.field=value]

Steps: bring up the local stack (S3 + MLflow) -> make sample portrait videos from photos bundled with installed
packages and upload them with a manifest -> `prepare` them into WebDataset shards on S3 (Ray Data) -> validate
the shards and draw a preview grid -> train the tiny RigFace for a short budget (Ray Train, 2 workers, MLflow)
-> edit a portrait with the trained model -> evaluate on the val split (Table-1 report) -> print where to look
and write ``{out}/outputs.json``. The stack is left running so MLflow can be opened; `rigface stack down` stops it.
The budget lives in configs/demo.yaml (``--quick``: the smallest one, used by the tests).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


from rigface.config import ConfigError, DemoConfig, RigFaceConfig, load_config

log = logging.getLogger("rigface.demo")

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_QUICK_CONFIG = REPO / "configs" / "demo-quick.yaml"
OUTPUTS_FILE = "outputs.json"
STEPS = 7


class DemoError(RuntimeError):
    """A demo step produced no usable result (no shards, invalid shards, no model ...)."""


def load_demo_config(files: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (),
                     quick: bool = False) -> tuple[RigFaceConfig, DemoConfig]:
    """configs/demo.yaml (or demo-quick.yaml), then extra files, RIGFACE__* env, then `--set` overrides.

    Overrides of the demo's own knobs use the `demo.` prefix, e.g. ``demo.n_videos=6``.
    """
    cfg = load_config([DEMO_QUICK_CONFIG if quick else DEMO_CONFIG, *files], overrides)
    budget = cfg.demo
    from rigface.samples import PHOTOS

    for role in ("source", "driver"):  # checked now, not after minutes of training
        if getattr(budget, role) not in PHOTOS:
            raise ConfigError(f"demo.{role} must be one of {sorted(PHOTOS)}, got {getattr(budget, role)!r}")
    if budget.val_videos >= budget.n_videos:
        raise ConfigError(f"demo.val_videos ({budget.val_videos}) must be below demo.n_videos ({budget.n_videos})")
    return cfg, budget


# ---------------------------------------------------------------- progress


class Progress:
    """Numbered steps with their wall time, on the console (rich) and in the outputs."""

    def __init__(self, console) -> None:
        self.console = console
        self.times: dict[str, float] = {}
        self.n = 0

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.n += 1
        self.console.rule(f"[bold]step {self.n}/{STEPS}: {what}")
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.console.print(f"[red]step {self.n} ({name}) failed after {time.monotonic() - t0:.1f} s")
            raise
        self.times[name] = round(time.monotonic() - t0, 1)
        self.console.print(f"[green]done[/green] {what} in {self.times[name]:.1f} s")


# ---------------------------------------------------------------- steps


def start_stack(cfg: RigFaceConfig) -> dict[str, str]:
    """Bring the local stack up (a no-op if it runs already) and point this process at it."""
    from rigface.stack import LocalStack

    stack = LocalStack(cfg.storage.state_dir, cfg.storage.bucket)
    info = stack.up()
    env = stack.env(info)
    os.environ.update(env)  # the demo always uses its own local stack, whatever else the shell has set
    return {"state_dir": str(stack.state), "s3_endpoint": info.s3_endpoint, "mlflow_uri": info.mlflow_uri,
            "env_file": str(stack.env_file)}


def upload_videos(paths: Sequence[Path], prefix_url: str, val_videos: int) -> str:
    """Upload the videos and a manifest naming each one's split (the last ``val_videos`` go to val)."""
    from rigface.data import storage

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "video_id", "split"])
    for i, path in enumerate(paths):
        storage.upload_file(str(path), storage.join(prefix_url, path.name))
        split = "val" if i >= len(paths) - val_videos else "train"
        writer.writerow([path.name, path.stem, split])
    manifest = storage.join(prefix_url, "manifest.csv")
    storage.write_bytes(manifest, buf.getvalue().encode())
    return manifest


def check_shards(shards_url: str, preview_path: Path) -> dict[str, Any]:
    from rigface.data.preview import preview_png
    from rigface.data.dataset import iter_samples, validate

    report = validate(shards_url)
    if not report.ok:
        raise DemoError(f"shards under {shards_url} do not validate: {report.faults[:5]}")
    preview_path.write_bytes(preview_png(iter_samples(shards_url), rows=8, tile=96))
    return report.to_dict()


def edit_portrait(cfg: RigFaceConfig, model_dir: str, budget: DemoConfig, out: Path) -> dict[str, str]:
    """Edit the source person's portrait with the driver person's pose/expression/lighting."""
    import numpy as np
    from PIL import Image

    from rigface.edit import PortraitEditor
    from rigface.samples import sample_portraits

    portraits = sample_portraits()
    src, drv = portraits[budget.source], portraits[budget.driver]
    result = PortraitEditor.load(model_dir, cfg, device="cpu").edit(src, drv, edit=budget.edit)
    out.mkdir(parents=True, exist_ok=True)
    files = {"edited": out / "edited.png", "source": out / "source.png", "driver": out / "driver.png",
             "panels": out / "panels.png"}
    Image.fromarray(result.image).save(files["edited"])
    Image.fromarray(src).save(files["source"])
    Image.fromarray(drv).save(files["driver"])
    tile = 192
    row = [Image.fromarray(np.asarray(a)).convert("RGB").resize((tile, tile))
           for a in (src, drv, result.render, result.background, result.crop)]
    panels = Image.new("RGB", (tile * len(row), tile))
    for i, im in enumerate(row):
        panels.paste(im, (i * tile, 0))
    panels.save(files["panels"])
    return {k: str(v) for k, v in files.items()}


def download_model(model_uri: str, folder: Path) -> str:
    """The run's model folder, downloaded from MLflow into the demo's output folder (replacing an older one)."""
    import shutil

    import mlflow

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))
    if not (local / "model_index.json").exists():
        raise DemoError(f"{model_uri} holds no saved RigFace model (downloaded to {local})")
    return str(local)


def log_demo_artifacts(run_id: str, files: Mapping[str, str]) -> None:
    """Preview grid and edit next to the run's metrics, so MLflow alone tells the story."""
    import mlflow

    client = mlflow.MlflowClient()
    for path in files.values():
        client.log_artifact(run_id, path, artifact_path="demo")


# ---------------------------------------------------------------- the demo


def run_demo(cfg: RigFaceConfig, budget: DemoConfig, out: Path, console=None) -> dict[str, Any]:
    """Run every step; returns what ``outputs.json`` holds. Ray is started here and shut down at the end."""
    from rich.console import Console

    console = console or Console()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(console)
    bucket = cfg.storage.bucket
    root = f"s3://{bucket}/{budget.prefix.strip('/')}"
    run_name = f"demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    # The resolved config goes into outputs.json too, so notebooks edit with the settings the model was trained with.
    outputs: dict[str, Any] = {"run_name": run_name, "bucket": bucket, "out_dir": str(out),
                               "config": cfg.model_dump(mode="json"), "demo": budget.model_dump()}
    t_start = time.monotonic()

    with progress.step("stack", "local stack (S3 + MLflow)"):
        outputs["stack"] = start_stack(cfg)
        console.print(f"S3 {outputs['stack']['s3_endpoint']}  MLflow {outputs['stack']['mlflow_uri']}")

    import ray

    from pipelines.ray_env import forwarded_env, start_local_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    started_ray = False
    if not ray.is_initialized():
        env = forwarded_env()
        start_local_ray(num_cpus=max(2, os.cpu_count() or 1), runtime_env={"env_vars": env} if env else None)
        started_ray = True
    try:
        with progress.step("videos", f"{budget.n_videos} sample portrait videos"):
            from rigface.samples import make_sample_videos

            paths = make_sample_videos(out / "videos", n_videos=budget.n_videos, seconds=budget.seconds,
                                       fps=budget.fps, size=budget.size)
            outputs["videos"] = upload_videos(paths, f"{root}/videos", budget.val_videos)
            console.print(f"{len(paths)} videos -> {outputs['videos']}")

        shards_url = f"{root}/shards"
        with progress.step("prepare", "prepare: videos -> WebDataset shards (Ray Data)"):
            from pipelines.prepare import run_prepare

            summary = run_prepare(cfg, source=outputs["videos"], output=shards_url, overwrite=True)
            if summary.pairs == 0:
                raise DemoError(f"prepare wrote no pairs: video skips {summary.video_skips}, "
                                f"frame skips {summary.frame_skips}")
            outputs["shards"] = shards_url
            outputs["prepare"] = {"pairs": summary.pairs, "per_split": summary.per_split,
                                  "videos_ok": summary.videos_ok, "video_skips": summary.video_skips,
                                  "frame_skips": summary.frame_skips}
            console.print(f"{summary.pairs} pairs {summary.per_split} in {summary.shards_written} shard(s)")

        with progress.step("shards", "validate shards + preview grid"):
            outputs["validation"] = check_shards(shards_url, out / "preview.png")
            outputs["preview"] = str(out / "preview.png")

        with progress.step("train", f"train {cfg.train.max_steps} steps, {cfg.train.num_workers} workers (Ray Train)"):
            from pipelines.train import run_train

            result = run_train(cfg, data=shards_url, run_name=run_name)
            if not result.model_uri or not result.mlflow_run_id:
                raise DemoError(f"training finished without a model (run {result.mlflow_run_id})")
            outputs["mlflow"] = {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "run_id": result.mlflow_run_id,
                                 "experiment": cfg.train.experiment, "model_uri": result.model_uri,
                                 "run_url": _run_url(result.mlflow_run_id)}
            outputs["train"] = {"steps": result.steps, "checkpoint": result.checkpoint_uri,
                                "loss": result.metrics.get("loss")}
            console.print(f"run {result.mlflow_run_id}: {result.steps} steps, model {result.model_uri}")

        model_dir = download_model(result.model_uri, out / "model")  # one download: the edit and the evaluation
        with progress.step("edit", f"edit {budget.source} with {budget.driver}'s {budget.edit}"):
            outputs["edit"] = edit_portrait(cfg, model_dir, budget, out / "edit")
            console.print(f"edited image: {outputs['edit']['edited']}")

        with progress.step("evaluate", "evaluate on the val split (Table-1 report)"):
            from pipelines.evaluate import run_evaluate

            report = run_evaluate(cfg, data=shards_url, model=model_dir, out=str(out / "report"),
                                  mlflow_run_id=result.mlflow_run_id)
            outputs["report"] = {"markdown": str(out / "report" / "report.md"),
                                 "json": str(out / "report" / "report.json"),
                                 "metrics": report.metrics, "samples": report.samples}
        log_demo_artifacts(result.mlflow_run_id, {"preview": outputs["preview"], **outputs["edit"]})
    finally:
        if started_ray:
            ray.shutdown()

    outputs["model_dir"] = model_dir
    outputs["step_seconds"] = progress.times
    outputs["seconds"] = round(time.monotonic() - t_start, 1)
    path = out / OUTPUTS_FILE
    path.write_text(json.dumps(outputs, indent=2, default=str))
    outputs["outputs_file"] = str(path)
    print_summary(console, outputs)
    return outputs


def _run_url(run_id: str) -> str:
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    return f"{os.environ['MLFLOW_TRACKING_URI']}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def print_summary(console, outputs: Mapping[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"RigFace demo: done in {outputs['seconds']:.0f} s", show_lines=False)
    table.add_column("what")
    table.add_column("where", overflow="fold")
    table.add_row("MLflow run", outputs["mlflow"]["run_url"])
    table.add_row("MLflow run id", outputs["mlflow"]["run_id"])
    table.add_row("trained model", outputs["mlflow"]["model_uri"])
    table.add_row("shards", outputs["shards"])
    table.add_row("preview grid", outputs["preview"])
    table.add_row("edited image", outputs["edit"]["edited"])
    table.add_row("edit panels", outputs["edit"]["panels"])
    table.add_row("eval report", outputs["report"]["markdown"])
    table.add_row("all of the above", outputs["outputs_file"])
    console.print(table)
    steps = "  ".join(f"{k} {v:.0f}s" for k, v in outputs["step_seconds"].items())
    console.print(f"step times: {steps}")
    console.print("Notebooks: jupyter lab notebooks/  (they read RIGFACE_DEMO_OUTPUTS, default demo_out/outputs.json)")
    console.print("The local stack is still running, for MLflow. Stop it with: [bold]rigface stack down[/bold]")
    console.print("MLflow asks for a login: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from "
                  "[bold]rigface stack env[/bold]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest budget (what the tests run)")
    p.add_argument("--out", default="demo_out", help="local folder for the outputs (default: demo_out)")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="extra YAML config merged over configs/demo.yaml (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. --set train.max_steps=100 or --set demo.n_videos=6")
    p.add_argument("--log-level", default=os.environ.get("RIGFACE_LOG_LEVEL", "WARNING"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rich.console import Console

    console = Console()
    try:
        cfg, budget = load_demo_config(args.config, args.overrides, quick=args.quick)
    except ConfigError as exc:
        console.print(f"[red]demo: {exc}")
        return 2
    try:
        run_demo(cfg, budget, Path(args.out), console)
    except _expected_errors() as exc:
        console.print(f"[red]demo failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The typed errors of each step (bad input, a job that failed): a message, not a traceback."""
    from pipelines.evaluate import EvaluateError
    from pipelines.prepare import PrepareError
    from pipelines.train import TrainError
    from rigface.edit import EditError
    from rigface.samples import SampleError
    from rigface.stack import StackError

    return (DemoError, ConfigError, StackError, SampleError, PrepareError, TrainError, EditError, EvaluateError)


if __name__ == "__main__":
    sys.exit(main())
