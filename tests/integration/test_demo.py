"""`make demo` end to end (`python -m pipelines.demo --quick`) on the session's local stack, then the three
notebooks executed with nbclient on the demo's outputs. The biggest integration test: about 2-3 minutes on 2 CPUs."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TABLE1 = ("id_l2", "ssim", "lpips", "fid", "apd", "aed", "ald")
STEPS = ("stack", "videos", "prepare", "shards", "train", "edit", "evaluate")


@pytest.fixture(scope="module")
def demo(stack, tmp_path_factory):
    """Run the quick demo once, reusing the session stack (same state dir and bucket: `up` is a no-op)."""
    from pipelines.demo import main

    out = tmp_path_factory.mktemp("demo_out")
    saved = dict(os.environ)
    try:
        rc = main(["--quick", "--out", str(out),
                   "--set", f"storage.state_dir={stack.state}", "--set", f"storage.bucket={stack.bucket}",
                   "--set", f"demo.prefix=tests/demo-{uuid.uuid4().hex[:8]}"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert rc == 0
    return json.loads((out / "outputs.json").read_text()), out


def test_demo_writes_every_output(demo, stack):
    import mlflow
    from PIL import Image

    from rigface.data.dataset import validate
    from rigface.samples import sample_portraits

    outputs, out = demo
    assert set(STEPS) == set(outputs["step_seconds"])
    assert outputs["stack"]["state_dir"] == str(stack.state)
    assert stack.status()["running"]  # left up for the user to open MLflow

    # Shards: every one validates, both splits hold pairs, and the counts match what prepare reported.
    report = validate(outputs["shards"])
    assert report.ok, report.faults[:5]
    assert report.samples == outputs["prepare"]["pairs"] > 0
    assert report.per_split.get("train", 0) > 0 and report.per_split.get("val", 0) > 0
    with Image.open(outputs["preview"]) as grid:
        assert grid.width > 0 and grid.height > 0

    # MLflow: the run finished with a loss per step, a validation grid, and the demo's images.
    client = mlflow.MlflowClient(tracking_uri=outputs["mlflow"]["tracking_uri"])
    run_id = outputs["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run_id, "loss")
    assert len(losses) == outputs["train"]["steps"] > 0 and all(np.isfinite(m.value) for m in losses)
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run_id, "val"))
    demo_artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, "demo")}
    assert {"preview.png", "edited.png", "panels.png"} <= demo_artifacts
    assert "eval/count_samples" in run.data.metrics

    # The edit: an image of the source portrait's size, changed where the face is.
    source = sample_portraits()[outputs["demo"]["source"]]
    edited = np.asarray(Image.open(outputs["edit"]["edited"]).convert("RGB"))
    assert edited.shape == source.shape
    assert np.abs(edited.astype(int) - source.astype(int)).mean() > 0.5

    # The report: the paper's Table-1 columns, scored on the val split.
    rep = json.loads(Path(outputs["report"]["json"]).read_text())
    assert tuple(rep["columns"]) == TABLE1 and set(rep["metrics"]) == set(TABLE1)
    assert rep["counts"]["samples"] >= 1 and rep["info"]["split"] == "val"
    assert rep["metrics"]["ssim"] is not None and rep["metrics"]["lpips"] is not None
    md = Path(outputs["report"]["markdown"]).read_text()
    assert "RigFace (paper, Table 1)" in md and "ID L2" in md


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec that runs this interpreter (the project's venv), found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "rigface-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rigface (tests)", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield "rigface-test"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_all_three_notebooks_are_tested():
    assert [p.name for p in NOTEBOOKS] == ["01_inspect_shards.ipynb", "02_follow_a_run.ipynb",
                                           "03_edit_a_portrait.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_demo_outputs(path, demo, kernel_name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    outputs, out = demo
    monkeypatch.setenv("RIGFACE_DEMO_OUTPUTS", str(out / "outputs.json"))
    nb = nbformat.read(path, as_version=4)
    # Raises CellExecutionError (the failing cell and its traceback) on any cell error.
    NotebookClient(nb, timeout=240, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert str(out / "outputs.json") in "".join(o.get("text", "") for o in outs if o["output_type"] == "stream")
    assert any("image/png" in o.get("data", {}) for o in outs), "the notebook drew no figure"
