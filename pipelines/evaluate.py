"""`rigface evaluate`: batch editing of the validation split with Ray Data, then the Table-1 metrics.

    shards of the split -> read samples (Ray tasks) -> [actor pool] edit + score -> driver: ReportBuilder -> report

Each validation pair is edited as the training pair it is: the source crop, the target's render, background
composite and expression go in, and the output is compared with the target frame (SSIM, LPIPS, FID), with the
source for identity, and with the target's 3D fit for pose/expression/lighting. The actors hold the model and the
metric networks; they return per-pair numbers and Inception features, never images, so the driver's memory stays
small. Bad samples and failed edits are counted as skips in the report, never a crash.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pipelines.ray_env import bound_ray_data, ensure_ray
from pipelines.resources import use_gpus
from rigface.config import RigFaceConfig
from rigface.data import storage
from rigface.eval.fid import FEATURE_DIM
from rigface.eval.report import EvalReport
from rigface.eval.scorer import PER_PAIR, PairScorer, ReportBuilder

log = logging.getLogger(__name__)

MEMBER_COLUMNS = ("source.jpg", "target.jpg", "render.png", "background.png", "expression.npy",
                  "mask_source.png", "mask_target.png", "meta.json")


class EvaluateError(RuntimeError):
    """Nothing to evaluate (no shards, empty split) or an unusable model."""


# ---------------------------------------------------------------- shards


def val_shards(data: str, split: str = "val") -> list[str]:
    """The committed, non-empty shards of ``split`` under a dataset URL (or one .tar URL)."""
    from rigface.data.dataset import Dataset

    if data.endswith(".tar"):
        return [data]
    return [s.url for s in Dataset(data).shards(split) if s.samples != 0]


def read_shard_rows(row: dict[str, Any], limits=None) -> list[dict[str, Any]]:
    """Ray flat_map: one shard URL -> its raw samples (key + member bytes) through the dataset's one reader.
    A sample over the size limits is a skip row; an unreadable shard is one skip row."""
    from rigface.data.dataset import read_shard
    from rigface.data.shards import SKIP, ShardError

    url = row["shard"]
    out = []
    try:
        for raw in read_shard(url, limits):
            if raw.get(SKIP):
                log.warning("evaluate: skipping sample %s: %s", raw["__key__"], raw[SKIP])
                out.append({"key": raw["__key__"], "error": "oversize_sample", **{m: b"" for m in MEMBER_COLUMNS}})
                continue
            members = {k.lstrip("."): v for k, v in raw.items() if not k.startswith("__")}
            out.append({"key": raw["__key__"], "error": "",
                        **{m: members.get(m, b"") for m in MEMBER_COLUMNS}})
    except ShardError as exc:
        log.warning("evaluate: skipping unreadable shard %s: %s", url, exc)
        out.append({"key": url, "error": "unreadable_shard", **{m: b"" for m in MEMBER_COLUMNS}})
    return out


# ---------------------------------------------------------------- edit + score (no Ray here: unit-testable)


EditFn = Callable[[list[Any]], list[np.ndarray]]  # decoded PairSamples -> edited crops (uint8 HxWx3)


def edit_and_score(rows: Sequence[dict[str, Any]], edit_fn: EditFn, scorer: PairScorer,
                   save_url: str | None = None, limits=None) -> list[dict[str, Any]]:
    """Decode, edit and score one batch of raw rows; one record per row, skips recorded."""
    from rigface.data.dataset import ReadLimits
    from rigface.data.schema import SchemaError, decode_sample

    limits = limits or ReadLimits()

    records: list[dict[str, Any]] = []
    samples = []
    for row in rows:
        if row.get("error"):
            records.append(_skip_record(row["key"], row["error"]))
            continue
        try:
            samples.append(decode_sample({"__key__": row["key"], **{m: row[m] for m in MEMBER_COLUMNS}},
                                         limits.decode))
        except SchemaError as exc:
            log.warning("evaluate: undecodable sample %s: %s", row["key"], exc)
            records.append(_skip_record(row["key"], "bad_sample"))
    if not samples:
        return records
    try:
        edited = edit_fn(samples)
    except (ValueError, RuntimeError) as exc:  # shape/dim mismatches, CUDA OOM ...
        log.warning("evaluate: editing %d samples failed: %s", len(samples), exc)
        return records + [_skip_record(s.key, "edit_failed") for s in samples]
    scored = scorer.score(edited, [s.target for s in samples], [s.source for s in samples],
                          keys=[s.key for s in samples])
    if save_url:
        for s, img in zip(samples, edited):
            _save_png(storage.join(save_url, s.key.replace("/", "__") + ".png"), img)
    return records + scored


def _skip_record(key: str, reason: str) -> dict[str, Any]:
    return {"key": key, **{m: math.nan for m in PER_PAIR}, "skips": [reason], "unscored": True}


def _save_png(url: str, img: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())


def pipeline_edit_fn(pipeline, steps: int, seed: int) -> EditFn:
    """Edit decoded samples with a RigFacePipeline: the target's conditions applied to the source."""
    import torch

    def edit(samples: list[Any]) -> list[np.ndarray]:
        # one generator per edit: an edit does not depend on the batch it lands in
        gen = [torch.Generator(device="cpu").manual_seed(seed) for _ in samples]
        out = pipeline(
            source=[s.source for s in samples], background=[s.background for s in samples],
            render=[s.render for s in samples],
            expression=np.stack([np.asarray(s.expression, np.float32) for s in samples]),
            num_inference_steps=steps, generator=gen, output_type="np",
        )
        return list(out.images)

    return edit


# ---------------------------------------------------------------- Ray actor and row format


def to_columns(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Records -> fixed Ray Data columns (features as (N, 2048) arrays, zeros where absent)."""
    n = len(records)
    cols: dict[str, Any] = {"key": np.array([r["key"] for r in records], dtype=object)}
    for m in PER_PAIR:
        cols[m] = np.array([float(r.get(m, math.nan)) for r in records], dtype=np.float64)
    cols["skips"] = np.array([",".join(r.get("skips") or ()) for r in records], dtype=object)
    cols["unscored"] = np.array([bool(r.get("unscored", False)) for r in records])
    has = np.array([r.get("feat_edited") is not None for r in records])
    cols["has_feat"] = has
    for name in ("feat_edited", "feat_target"):
        arr = np.zeros((n, FEATURE_DIM), np.float32)
        for i, r in enumerate(records):
            if has[i]:
                arr[i] = r[name]
        cols[name] = arr
    return cols


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    rec = {"key": row["key"], **{m: float(row[m]) for m in PER_PAIR},
           "skips": [s for s in str(row["skips"]).split(",") if s]}
    if row["has_feat"]:
        rec["feat_edited"], rec["feat_target"] = row["feat_edited"], row["feat_target"]
    return rec


class EditScoreActor:
    """Holds the loaded model and the metric networks; ``__call__`` maps a batch of raw rows to metric rows."""

    def __init__(self, cfg: RigFaceConfig, model: str, steps: int, seed: int, save_url: str | None):
        import torch

        from rigface.model import load_rigface
        from rigface.data.dataset import ReadLimits

        device = "cuda" if torch.cuda.is_available() else "cpu"
        ev = cfg.evaluate  # fp32 and the model's own sampler unless the config opts out
        pipe = load_rigface(model, device=device, dtype=ev.torch_dtype(), scheduler=ev.scheduler, model_cfg=cfg.model)
        pipe.optimize_for_speed(channels_last=ev.channels_last and device == "cuda", compile=ev.compile)
        self.edit_fn = pipeline_edit_fn(pipe, steps, seed)
        self.scorer = PairScorer.build(lpips_net=cfg.evaluate.lpips_net, face_cfg=cfg.face, device=device)
        self.save_url = save_url
        self.limits = ReadLimits.from_config(cfg.reader)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = list(batch["key"])
        rows = [{c: batch[c][i] for c in ("key", "error", *MEMBER_COLUMNS)} for i in range(len(keys))]
        return to_columns(edit_and_score(rows, self.edit_fn, self.scorer, self.save_url, self.limits))


# ---------------------------------------------------------------- the job


def run_evaluate(cfg: RigFaceConfig, *, data: str, model: str, out: str, mlflow_run_id: str | None = None,
                 max_samples: int | None = None, steps: int | None = None, num_actors: int | None = None,
                 actor_cpus: float | None = None, save_images: bool = False, seed: int | None = None) -> EvalReport:
    """Edit and score the validation split of ``data`` with ``model``; write report.md/.json to ``out``."""
    import ray

    ev = cfg.evaluate
    steps = steps or ev.num_inference_steps
    max_samples = max_samples or ev.max_samples
    num_actors = num_actors or ev.num_actors
    actor_cpus = actor_cpus or ev.actor_cpus
    seed = ev.seed if seed is None else seed
    urls = val_shards(data, ev.split)
    if not urls:
        raise EvaluateError(f"no {ev.split!r} shards under {data}")
    t0 = time.monotonic()
    ensure_ray()
    bound_ray_data(ev.stall_timeout_s)  # every retry bounded (Ray's defaults are unlimited)
    ds = ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=len(urls))
    from rigface.data.dataset import ReadLimits

    ds = ds.flat_map(read_shard_rows, fn_kwargs={"limits": ReadLimits.from_config(cfg.reader)}, num_cpus=0.25,
                     max_retries=ev.max_retries)
    if max_samples:
        ds = ds.limit(max_samples)
    # resources.gpus: on for an autoscaling cluster (GPU nodes may be at zero now); auto: GPUs present now.
    use_gpu = use_gpus(cfg.resources, ray.cluster_resources().get("GPU", 0))
    ds = ds.map_batches(
        EditScoreActor,
        fn_constructor_args=(cfg, model, steps, seed, storage.join(out, "edited") if save_images else None),
        batch_size=ev.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        # Fractional CPUs keep a CPU free for the read tasks (a pool that takes them all hangs the job).
        num_cpus=actor_cpus, num_gpus=1 if use_gpu else None,
        # Calls to an actor on a dying node fail fast until Ray marks the node dead (~20-30 s): a counted call
        # retry is spent inside that window. Unlimited call retries stay bounded by the actor's restarts.
        max_restarts=ev.max_actor_restarts, max_task_retries=-1,
    )
    builder = ReportBuilder()
    per_pair = []
    for row in ds.iter_rows():
        rec = from_row(row)
        if row["unscored"]:
            for reason in rec["skips"]:
                builder.skip(reason)
        else:
            builder.add([rec])
        per_pair.append({k: v for k, v in rec.items() if not k.startswith("feat_")})
    if builder.samples == 0:
        raise EvaluateError(f"the {ev.split!r} split of {data} holds no samples")
    info = {"data": data, "split": ev.split, "model": model, "shards": len(urls), "steps": steps,
            "lpips": ev.lpips_net, "identity": cfg.face.identity, "fit": cfg.face.fit,
            "expression": cfg.face.expression, "seconds": round(time.monotonic() - t0, 1)}
    report = builder.build(info)
    write_report(report, out, per_pair)
    if mlflow_run_id:
        log_to_mlflow(report, mlflow_run_id, cfg.storage.mlflow_tracking_uri)
    return report


def write_report(report: EvalReport, out: str, per_pair: Iterable[dict[str, Any]] = ()) -> None:
    storage.write_bytes(storage.join(out, "report.md"), report.to_markdown().encode())
    storage.write_bytes(storage.join(out, "report.json"), report.to_json().encode())
    lines = [json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
             for r in per_pair]
    storage.write_bytes(storage.join(out, "per_pair.jsonl"), ("\n".join(lines) + "\n").encode() if lines else b"")


def log_to_mlflow(report: EvalReport, run_id: str, tracking_uri: str | None = None) -> None:
    """Metrics under eval/* and the two report files as artifacts of an existing run (it is not ended)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in report.mlflow_metrics().items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, report.to_markdown(), "eval/report.md")
    client.log_text(run_id, report.to_json(), "eval/report.json")
