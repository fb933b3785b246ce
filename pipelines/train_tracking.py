"""MLflow for `rigface train`: one run per run name (found again by tag on a rerun), params from the driver,
buffered per-step metrics, images and checkpoint URIs from rank 0. MLflowLoggerCallback is rejected by Ray
Train V2, so the driver and rank 0 talk to the tracking server with the plain client."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping

from rigface.redact import redact

log = logging.getLogger(__name__)

RUN_NAME_TAG = "rigface.run_name"
_SECRET_NAME = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.I)
_MAX_PARAM_CHARS = 6000


def tracking_uri(cfg_uri: str | None) -> str | None:
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI")


def client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def code_version() -> dict[str, str]:
    """The package version and, when run from a git checkout, the commit (read-only git call)."""
    from rigface import __version__

    out = {"rigface.version": __version__}
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["mlflow.source.git.commit"] = sha
        out["rigface.git_dirty"] = str(bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def safe_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params, leaving out anything whose name looks like a secret."""
    return {k: redact(v)[:_MAX_PARAM_CHARS] for k, v in flat.items() if not _SECRET_NAME.search(k)}


def find_or_create_run(mlflow_client, experiment: str, run_name: str) -> tuple[str, bool]:
    """(run id, resumed): the newest run tagged with this run name in the experiment, or a new one."""
    exp = mlflow_client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment(experiment)
    safe_name = run_name.replace("'", "")
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{safe_name}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    return run.info.run_id, False


def log_params_once(mlflow_client, run_id: str, params: Mapping[str, str]) -> list[str]:
    """Log params not yet on the run; a value that changed on a resume is kept as a tag, not an error.
    Returns the names whose value changed."""
    from mlflow.entities import Param, RunTag

    existing = mlflow_client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [k for k, v in params.items() if k in existing and existing[k] != v]
    for i in range(0, len(new), 100):
        mlflow_client.log_batch(run_id, params=new[i : i + 100])
    if changed:
        tags = [RunTag(f"resume.changed.{k}", params[k]) for k in changed]
        mlflow_client.log_batch(run_id, tags=tags[:100])
        log.info("train: config changed on resume: %s", ", ".join(changed))
    return changed


class MetricBuffer:
    """Per-step metrics kept in memory and sent in one log_batch call every few steps (rank 0 only)."""

    def __init__(self, mlflow_client, run_id: str):
        self.client = mlflow_client
        self.run_id = run_id
        self.pending: list[Any] = []

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not kill a training run
                log.warning("train: could not log %d metrics to MLflow: %s", len(chunk), exc)


def register_model(mlflow_client, run_id: str, name: str, artifact_path: str = "model") -> str:
    """Register the run's model folder under ``name``; returns 'models:/name/version'."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code if hasattr(exc, "error_code") else exc):
            raise
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id)
    return f"models:/{name}/{version.version}"
