"""`rigface prepare`: Ray Data streams portrait videos into WebDataset training shards.

Stages::

    lease on the output  ->  list + sampled content hash (driver threads)  ->  plan (rigface.data.dataset:
    de-duplicate, split by video, assign videos to shards; committed before any shard, compared on a rerun)  ->
    per video: decode + sample pairs -> face analysis -> pair conditions + encode, in a face pool sized by
    pipelines.resources: on CPUs, actors that each run all three for a video in one watchdog child (frames
    never cross a process; one actor per core); with GPUs, CPU decode tasks -> GPU face actors -> CPU encode
    tasks  ->
    shard assembly and write (driver streams the ordered output, a thread pool writes each shard, then its
    stats file)  ->  index + dataset card.

The shard is the unit of work and of retry: videos go to shards by their sorted content hash and the plan is
committed first, so a rerun resumes exactly that plan, skipping every shard whose stats file exists, and a
changed listing or config is refused (``--append`` plans new videos as the next version). Memory stays bounded: Ray Data streams with
backpressure and the driver holds at most the shards still being assembled (output order is preserved, so
that is about one shard).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from pipelines.guarded import Crashed, GuardedWorker, TimedOut
from pipelines.ray_env import bound_ray_data, ensure_ray
from pipelines.resources import face_pool
from rigface import __version__
from rigface.config import RigFaceConfig
from rigface.data import sources, storage
from rigface.data.dataset import (
    Dataset, DatasetError, ReadLimits, finish_version, plan_differences, plan_record, plan_shards, sample_config,
)
from rigface.data.sampling import (face_spans, frames_of, max_pairs, min_gap_frames, probe_indices, replace_failed,
                                   sample_distant_pairs, sample_pairs_among)
from rigface.data.schema import PairSample, encode_sample, pack_sample, sample_key
from rigface.data.video import Video, VideoError
from rigface.face.config import FaceConfig

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """The job cannot run as asked (existing dataset without --append/--overwrite, empty source...)."""


@dataclass
class PrepareSummary:
    output: str
    version: int
    sources: list[str]
    videos_listed: int = 0
    videos_duplicate: int = 0          # same content as a video already in the dataset or earlier in the listing
    videos_planned: int = 0
    shards_planned: int = 0
    shards_written: int = 0
    shards_resumed: int = 0            # already done by an earlier run
    videos_ok: int = 0
    pairs: int = 0
    frames_analyzed: int = 0
    video_skips: dict[str, int] = field(default_factory=dict)
    frame_skips: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    content_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- face backend (pluggable for tests/bench)


class FaceBackend:
    """What the pipeline needs from face analysis: one frame -> FaceFit | FaceSkip, a pair -> conditions."""

    def __init__(self, face_cfg) -> None:
        from rigface.face.analyzer import FaceAnalyzer

        self.analyzer = FaceAnalyzer(face_cfg)

    def analyze(self, rgb: np.ndarray):
        return self.analyzer.analyze(rgb)

    @staticmethod
    def conditions(source_fit, target_fit):
        return _build_conditions()(source_fit, target_fit, edit="all")


def _build_conditions():
    try:
        from rigface.face.conditions import build_conditions
    except ImportError:
        from rigface.face import build_conditions  # type: ignore[attr-defined,no-redef]
    return build_conditions


# ---------------------------------------------------------------- stage functions (run in Ray workers)


def hash_videos(refs: list[dict[str, Any]], max_bytes: int = 1 << 62) -> list[dict[str, Any]]:
    """Every listed video's identity (size + sampled windows, sources.content_hash), in driver threads.

    A few small reads per video: I/O-bound and cheap, so threads here beat a Ray stage's start-up, and the
    listing, hashing and planning stay a small share of the run (bench/prepare.py prints it).
    """
    if not refs:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(refs)), thread_name_prefix="hash") as pool:
        return list(pool.map(functools.partial(hash_row, max_bytes=max_bytes), refs))


def hash_row(row: dict[str, Any], *, max_bytes: int = 1 << 62) -> dict[str, Any]:
    row["content_hash"] = ""
    row["error"] = ""
    row["status"], size = sources.check_source(row["url"], max_bytes)  # before any byte is read
    if row["status"]:
        row["error"] = row["status"]
        return row
    try:
        row["content_hash"] = sources.content_hash(row["url"], size)
    except Exception as exc:  # noqa: BLE001 - an unreadable object is a recorded skip, not a crash
        row["status"] = "unreadable"
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


_PROBE_DETECTOR: Any = None


def _probe_detector():
    """One YuNet per worker process for the face probe (built on first use; ~1 ms a call at 320 px)."""
    global _PROBE_DETECTOR
    if _PROBE_DETECTOR is None:
        from rigface.face.detect import YuNetDetector

        _PROBE_DETECTOR = YuNetDetector()
    return _PROBE_DETECTOR


def probe_faces(video: Video, probes: list[int], probe_side: int, min_confidence: float,
                min_face_size: float) -> list[bool]:
    """Whether each probed frame holds a face the analyzer would take (a low-resolution YuNet pass)."""
    import cv2

    frames, _ = video.read_each(probes)
    det = _probe_detector()
    out = []
    for i in probes:
        frame = frames.get(i)
        if frame is None:
            out.append(False)
            continue
        h, w = frame.shape[:2]
        k = min(1.0, probe_side / max(h, w))
        small = frame if k >= 1.0 else cv2.resize(frame, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
        out.append(any(d.score >= min_confidence and d.size / k >= min_face_size for d in det.detect(small)))
    return out


_DECODE_GUARDS: dict[tuple[float, int], GuardedWorker] = {}  # one watchdog child per Ray worker process


def decode_row(row: dict[str, Any], *, n_pairs: int, spare: int, min_gap_seconds: float, seed: int,
               max_side: int, probe: dict[str, Any] | None = None, timeout_s: float = 600.0,
               retries: int = 2) -> dict[str, Any]:
    """Ray task: decode one video in this worker's watchdog child (a decoder crash or hang costs the video,
    not the worker)."""
    guard = _DECODE_GUARDS.get((timeout_s, retries))
    if guard is None:
        guard = _DECODE_GUARDS[(timeout_s, retries)] = GuardedWorker(None, timeout_s=timeout_s, retries=retries,
                                                                     name="prepare-decode")
    kwargs = dict(n_pairs=n_pairs, spare=spare, min_gap_seconds=min_gap_seconds, seed=seed, max_side=max_side,
                  probe=probe)
    out = guard.call(_decode_in_child, row, kwargs)
    if isinstance(out, (Crashed, TimedOut)):
        out = _empty_decode(row, _guard_status(out, row))
    return out


def _guard_status(outcome: Crashed | TimedOut, row: dict[str, Any]) -> str:
    log.warning("prepare: video quarantined", extra={"url": row["url"], "outcome": repr(outcome)})
    return "crashed" if isinstance(outcome, Crashed) else "timeout"


def _empty_decode(row: dict[str, Any], status: str) -> dict[str, Any]:
    out = {k: row[k] for k in ("shard", "video_id", "content_hash", "split", "url", "name")}
    out.update(status=status, n_frames=0, fps=0.0, candidates="[]", frame_indices=[], frames=None,
               frame_errors="{}", downscaled=False, face_coverage=-1.0)
    return out


def _decode_in_child(_state, row: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    return decode_video(row, **kwargs)


def decode_video(row: dict[str, Any], *, n_pairs: int, spare: int, min_gap_seconds: float, seed: int,
                 max_side: int, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open the video, find where it shows a face (a cheap probe over a frame stride, when `probe` is given),
    sample candidate pairs (with spares) among those frames, decode them."""
    out = _empty_decode(row, "")
    try:
        with sources.local_copy(row["url"]) as path, Video(path, max_side=max_side) as video:
            info = video.info
            out.update(n_frames=info.n_frames, fps=info.fps, downscaled=info.downscaled)
            if probe:
                if max_pairs(info.n_frames, min_gap_frames(info.fps, min_gap_seconds)) == 0:
                    out["status"] = "too_short"
                    return out
                probes = probe_indices(info.n_frames, info.fps, probe["every_seconds"], probe["max_probes"])
                has_face = probe_faces(video, probes, probe["side"], probe["min_confidence"], probe["min_face_size"])
                out["face_coverage"] = round(sum(has_face) / max(1, len(probes)), 4)
                if not any(has_face):
                    out["status"] = "no_face"
                    return out
                cands = sample_pairs_among(face_spans(probes, has_face, info.n_frames), info.fps,
                                           n_pairs + spare, min_gap_seconds, seed=seed, salt=row["content_hash"])
                if not cands:
                    out["status"] = "face_too_brief"  # faces, but never two far enough apart
                    return out
            else:
                cands = sample_distant_pairs(info.n_frames, info.fps, n_pairs + spare, min_gap_seconds,
                                             seed=seed, salt=row["content_hash"])
            if not cands:
                out["status"] = "too_short"
                return out
            good, failed = video.read_each(frames_of(cands))
    except VideoError as exc:
        out["status"] = exc.reason
        return out
    except Exception as exc:  # noqa: BLE001 - e.g. the object vanished from S3: a recorded skip
        log.warning("prepare: cannot read video", extra={"url": row["url"], "error": repr(exc)})
        out["status"] = "unreadable"
        return out
    if not good:
        out["status"] = "decode_failed"
        return out
    idx = sorted(good)
    out.update(candidates=json.dumps(cands), frame_indices=idx, frames=pickle.dumps(np.stack([good[i] for i in idx]),
               protocol=5), frame_errors=json.dumps(failed))
    return out


class AnalyzeFrames:
    """Actor-pool stage: one watchdog child per actor holds the face backend (built once) and analyzes every
    decoded frame of a video; a video that kills the child ``retries + 1`` times is ``crashed``, one that runs
    past ``timeout_s`` is ``timeout``, and the actor goes on with the next video."""

    def __init__(self, face_cfg, backend_factory: Callable[[Any], Any] | None = None, *, timeout_s: float = 600.0,
                 retries: int = 2) -> None:
        self.guard = GuardedWorker(functools.partial(backend_factory or FaceBackend, face_cfg), timeout_s=timeout_s,
                                   retries=retries, name="prepare-face")
        self.guard.call(_ping)  # build the backend now: a broken face config fails the job at start, loudly

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        fits_col = []
        frames_col = batch["frames"]
        status = list(batch["status"])
        for i in range(len(batch["video_id"])):
            results: Any = {}
            if status[i] == "" and frames_col[i] is not None:
                results = self.guard.call(_analyze_video, list(batch["frame_indices"][i]), frames_col[i])
                if isinstance(results, (Crashed, TimedOut)):
                    status[i] = _guard_status(results, {"url": batch["url"][i]})
                    results = {}
            fits_col.append(pickle.dumps(results, protocol=5))
        batch = dict(batch)
        batch["status"] = np.array(status, dtype=object)
        batch["fits"] = np.array(fits_col, dtype=object)
        batch["frames"] = np.array([None] * len(fits_col), dtype=object)  # full frames are not needed further on
        batch["busy_analyze"] = np.full(len(fits_col), (time.perf_counter() - t0) / max(len(fits_col), 1))
        return batch


def _ping(_backend) -> bool:
    return True


def _analyze_video(backend, frame_indices: list[int], frames_blob: bytes) -> dict[int, Any]:
    """In the watchdog child: every frame of one video -> FaceFit | FaceSkip | ('fit_failed', why)."""
    results: dict[int, Any] = {}
    for fi, frame in zip(frame_indices, pickle.loads(frames_blob)):
        try:
            results[int(fi)] = backend.analyze(frame)
        except Exception as exc:  # noqa: BLE001 - one bad frame is a skip, not a dead worker
            results[int(fi)] = ("fit_failed", f"{type(exc).__name__}: {exc}"[:200])
    return results


class PrepareVideos:
    """Actor-pool stage on CPU nodes: one watchdog child per actor holds the face backend and takes each video
    from its bytes to encoded samples (decode_video, analyze, build_samples_row), so frames never leave that
    process and no task competes with the pool for the cores. A video that kills the child ``retries + 1`` times
    is ``crashed``, one that runs past ``timeout_s`` is ``timeout``; the actor goes on with the next video."""

    def __init__(self, face_cfg, backend_factory: Callable[[Any], Any] | None = None, *,
                 decode: dict[str, Any], build: dict[str, Any], timeout_s: float = 600.0, retries: int = 2) -> None:
        self.guard = GuardedWorker(functools.partial(backend_factory or FaceBackend, face_cfg), timeout_s=timeout_s,
                                   retries=retries, name="prepare-video")
        self.decode, self.build = decode, build
        self.guard.call(_ping)  # build the backend now: a broken face config fails the job at start, loudly

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self.guard.call(_prepare_video, row, self.decode, self.build)
        if isinstance(out, (Crashed, TimedOut)):
            out = build_samples_row(_empty_decode(row, _guard_status(out, row)), **self.build)
            out["busy_analyze"] = time.perf_counter() - t0  # where the time went is unknown; the pool held it
        return out


def _prepare_video(backend, row: dict[str, Any], decode: dict[str, Any], build: dict[str, Any]) -> dict[str, Any]:
    """In the watchdog child: one video, decoded, analyzed and encoded, with each stage's seconds."""
    t0 = time.perf_counter()
    dec = decode_video(row, **decode)
    t1 = time.perf_counter()
    fits = {}
    if dec["status"] == "" and dec["frames"] is not None:
        fits = _analyze_video(backend, dec["frame_indices"], dec["frames"])
    t2 = time.perf_counter()
    out = build_samples_row(dict(dec, fits=pickle.dumps(fits, protocol=5), frames=None), backend_factory=backend,
                            **build)
    out.update(busy_decode=t1 - t0, busy_analyze=t2 - t1, busy_build=time.perf_counter() - t2)
    return out


def build_samples_row(row: dict[str, Any], *, n_pairs: int, min_gap_seconds: float, seed: int, jpeg_quality: int,
                      backend_factory: Callable[[Any], Any] | None = None, face_cfg=None) -> dict[str, Any]:
    """Choose the final pairs among frames whose analysis passed, build their conditions, encode the samples."""
    report: dict[str, Any] = {"video_id": row["video_id"], "content_hash": row["content_hash"],
                              "split": row["split"], "url": row["url"], "name": row["name"],
                              "status": row["status"], "n_frames": int(row["n_frames"] or 0),
                              "fps": float(row["fps"] or 0.0), "frame_skips": {}, "pairs": 0, "replaced": 0,
                              "face_coverage": float(row.get("face_coverage", -1.0))}
    keys: list[str] = []
    blobs: list[bytes] = []
    if not row["status"]:
        fits = pickle.loads(row["fits"])
        skips: Counter[str] = Counter(json.loads(row["frame_errors"]).values())
        ok: dict[int, Any] = {}
        for fi, res in fits.items():
            if isinstance(res, tuple):
                skips[res[0]] += 1
            elif hasattr(res, "reason"):
                skips[getattr(res.reason, "value", str(res.reason))] += 1
            else:
                ok[fi] = res
        report["frames_analyzed"] = len(fits)
        cands = [tuple(p) for p in json.loads(row["candidates"])]
        gap = min_gap_frames(report["fps"], min_gap_seconds)
        pairs = replace_failed(cands, ok, n_pairs, gap, seed=seed, salt=row["content_hash"])
        report["replaced"] = sum(1 for p in pairs if p not in cands[:n_pairs])
        qualities: list[dict[str, Any]] = []
        conditions = (backend_factory.conditions if backend_factory is not None and hasattr(
            backend_factory, "conditions") else FaceBackend.conditions)
        for a, b in pairs:
            try:
                cond = conditions(ok[a], ok[b])
                sample = to_pair_sample(row, a, b, ok[a], ok[b], cond, report["fps"], face_cfg=face_cfg)
                qualities.append(sample.meta["quality"])
                key = sample.key
                blobs.append(pack_sample(key, encode_sample(sample, jpeg_quality=jpeg_quality)))
                keys.append(key)
            except Exception as exc:  # noqa: BLE001 - one bad pair (render, cv2, schema) is a recorded skip, not a dead job
                skips["conditions_failed"] += 1
                log.warning("prepare: pair dropped", extra={"video": row["video_id"], "pair": (a, b), "error": repr(exc)})
        report["frame_skips"] = dict(skips)
        report["pairs"] = len(keys)
        report["quality"] = qualities
        if not keys:
            report["status"] = "no_pairs"
    return {"shard": row["shard"], "video_id": row["video_id"], "report": json.dumps(report, sort_keys=True),
            "keys": keys, "samples": blobs}


def to_pair_sample(row: dict[str, Any], a: int, b: int, src, tgt, cond, fps: float, face_cfg=None) -> PairSample:
    from rigface.face.quality import pair_quality

    key = sample_key(row["video_id"], a, b)
    limit = getattr(face_cfg, "max_padded_fraction", None)
    limit = FaceConfig().max_padded_fraction if limit is None else limit
    return PairSample(
        key=key, source=src.crop, target=tgt.crop, render=cond.render, background=cond.background,
        expression=np.asarray(cond.expression, np.float32), mask_source=cond.mask_source,
        mask_target=cond.mask_target,
        meta={
            "video_id": row["video_id"], "content_hash": row["content_hash"], "source_name": row["name"],
            "frames": [int(a), int(b)], "times": [round(a / fps, 6), round(b / fps, 6)], "fps": fps,
            "split": row["split"], "edit": getattr(cond, "edit", "all"),
            "boxes": {"source": [int(v) for v in src.crop_box], "target": [int(v) for v in tgt.crop_box]},
            "pose": {"source": src.pose.to_meta(), "target": tgt.pose.to_meta()},
            "lighting": {"source": np.asarray(src.lighting).round(6).tolist(),
                         "target": np.asarray(tgt.lighting).round(6).tolist()},
            "backends": {str(k): str(v) for k, v in {**src.backends, **tgt.backends}.items()},
            "scores": {"source": {k: float(v) for k, v in src.scores.items()},
                       "target": {k: float(v) for k, v in tgt.scores.items()}},
            "quality": pair_quality(src.scores, tgt.scores, src.pose.angles(), tgt.pose.angles(), src.expression,
                                    tgt.expression, src.lighting, tgt.lighting, max_padded_fraction=limit),
        },
    )


# ---------------------------------------------------------------- the job


def run_prepare(cfg: RigFaceConfig, *, source: str | Iterable[str] | None = None, output: str | None = None,
                overwrite: bool = False, append: bool = False,
                backend_factory: Callable[[Any], Any] | None = None) -> PrepareSummary:
    """Build (or resume, or extend) a dataset of training shards from portrait videos.

    ``backend_factory(face_cfg)`` replaces the default face backend (rigface.face FaceAnalyzer +
    build_conditions); it must return an object with ``analyze(rgb)`` and ``conditions(src_fit, tgt_fit)``.
    """
    t_start = time.monotonic()
    p = cfg.prepare
    srcs = [source] if isinstance(source, str) else list(source or ([p.source] if p.source else []))
    output = output or p.output
    if not srcs or not output:
        raise PrepareError("prepare needs a source and an output (--source, --output or prepare.source/output)")
    if overwrite and append:
        raise PrepareError("--overwrite and --append exclude each other")
    ds = Dataset(output, ReadLimits.from_config(cfg.reader))
    if overwrite:
        try:
            ds.refuse_root()  # before the lease: nothing is ever written to a bucket root
        except DatasetError as exc:
            raise PrepareError(str(exc)) from exc
    ensure_ray()
    _ensure_bucket(ds.url)
    owner = f"rigface prepare {' '.join(srcs)}"
    try:
        with ds.lease(owner, ttl_s=p.lease_seconds) as lease:
            return _prepare_locked(cfg, ds, lease, srcs, overwrite, append, backend_factory, t_start)
    except DatasetError as exc:
        raise PrepareError(str(exc)) from exc


def _prepare_locked(cfg: RigFaceConfig, ds: Dataset, lease, srcs: list[str], overwrite: bool, append: bool,
                    backend_factory, t_start: float) -> PrepareSummary:
    p = cfg.prepare
    if overwrite:
        n = ds.delete()
        log.warning("prepare: --overwrite: deleted the existing dataset", extra={"output": ds.url, "objects": n})
    versions = ds.plan_versions()
    card = ds.read_card()
    if card is not None and not versions:
        raise PrepareError(f"{ds.url} holds a dataset without plans (written by an older rigface): "
                           "use --overwrite to rebuild it")
    if not versions:
        version, known = 1, set()
    elif append:
        latest = versions[-1]
        if card is None or int(card.get("latest", 0)) < latest:
            raise PrepareError(f"version {latest} of {ds.url} is unfinished: rerun it (without --append) first")
        version, known = latest + 1, ds.planned_hashes()
    else:
        version = versions[-1]
        known = ds.planned_hashes(below=version)

    n_pairs = min(p.pairs_per_video, p.max_pairs_per_video)
    spare = max(2, math.ceil(n_pairs / 2))
    videos_per_shard = max(1, p.shard_size // n_pairs)
    summary = PrepareSummary(output=ds.url, version=version, sources=srcs)
    sample_cfg = sample_config(p.model_dump(mode="json"), cfg.face.model_dump(mode="json"))

    # -- list + sampled content hash (driver threads; one row per video, metadata only), then the plan, committed first
    t0 = time.monotonic()
    refs = [dict(r.to_dict(), video_id=r.video_id or "") for s in srcs for r in sources.list_videos(s)]
    summary.videos_listed = len(refs)
    bound_ray_data(p.stall_timeout_s)
    hashed = hash_videos(refs, max_bytes=p.max_video_bytes)
    unreadable = [r for r in hashed if r["error"]]
    plan, dups = plan_shards(ds, [r for r in hashed if not r["error"]], version=version,
                             videos_per_shard=videos_per_shard, val_fraction=p.val_fraction, seed=p.seed, known=known,
                             full_hash=functools.lru_cache(maxsize=None)(sources.full_content_hash))
    record = plan_record(ds, version, srcs, plan, dups, unreadable, sample_cfg)
    committed = ds.read_plan(version)
    if committed is None:
        ds.commit_plan(record)
    else:
        why = plan_differences(committed, record)
        if why:
            raise PrepareError(f"{ds.url} version {version} was planned differently: {'; '.join(why)}. Rerun with "
                               "the same source and settings to resume it, --append to add new videos as version "
                               f"{version + 1}, or --overwrite to start again")
    summary.videos_duplicate = len(dups)
    summary.videos_planned = sum(len(v) for v in plan.values())
    summary.shards_planned = len(plan)
    summary.stage_seconds["list_hash_plan"] = time.monotonic() - t0
    pending = {url: vids for url, vids in plan.items() if not ds.is_committed(url)}
    summary.shards_resumed = len(plan) - len(pending)
    log.info("prepare: plan", extra={"shards": len(plan), "pending": len(pending), "videos": summary.videos_planned})

    t0 = time.monotonic()
    if pending:
        _run_stages(cfg, ds, lease, pending, n_pairs, spare, backend_factory, summary)
    summary.stage_seconds["stream"] = time.monotonic() - t0

    # -- index + card (after every shard is committed)
    t0 = time.monotonic()
    lease.check()
    src_of = {v["content_hash"]: v["source"] for vids in plan.values() for v in vids}
    new_card = finish_version(ds, version=version, sources=srcs, shard_urls=plan, src_of=src_of,
                              unreadable=unreadable, dups=dups,
                              config=cfg.prepare.model_dump(mode="json") | {"face": cfg.face.model_dump(mode="json")},
                              code_version=__version__)
    entry = new_card["versions"][-1]
    summary.pairs = entry["totals"]["pairs"]
    summary.videos_ok = entry["totals"]["videos_ok"]
    summary.frames_analyzed = entry["totals"]["frames_analyzed"]
    summary.per_split = entry["totals"]["per_split"]
    summary.video_skips = entry["totals"]["video_skips"]
    summary.frame_skips = entry["totals"]["frame_skips"]
    summary.content_hash = entry["content_hash"]
    summary.shards_written = len(plan) - summary.shards_resumed
    summary.stage_seconds["card"] = time.monotonic() - t0
    summary.seconds = time.monotonic() - t_start
    return summary


def _ensure_bucket(output: str) -> None:
    u = storage.parse_url(output)
    if u.scheme == "s3":
        storage.ensure_bucket(u.bucket)


def _run_stages(cfg: RigFaceConfig, out: Dataset, lease, pending: dict[str, list[dict]], n_pairs: int, spare: int,
                backend_factory, summary: PrepareSummary) -> None:
    import ray

    p = cfg.prepare
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards arrive whole, one after another: bounded driver memory
    # One face pool sized from what Ray reports (pipelines.resources): on CPUs, actors that each take whole videos;
    # with GPUs, face actors fed by CPU decode tasks and followed by CPU encode tasks.
    pool = face_pool(cfg.resources, ray.cluster_resources())
    log.info("prepare: %s", pool.describe())
    rows = [dict(v, shard=url) for url, vids in pending.items() for v in vids]
    keep = ("shard", "video_id", "content_hash", "split", "url", "name")
    rows = [{k: r[k] for k in keep} for r in rows]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # Every retry is bounded (Ray's defaults are unlimited). A video that crashes or hangs is handled inside the
    # stage (pipelines.guarded), so these budgets are spent only on lost workers and nodes.
    task_opts = dict(max_retries=p.max_retries)
    # A face actor's calls are retried until the actor is dead for good (-1), which max_restarts bounds: when a
    # node dies, every call fails at once with ActorUnavailableError until the GCS declares the node dead
    # (health checks, ~15-30 s), and a count of retries was spent in that window and failed the job
    # (tests/integration/test_node_loss.py). A video that crashes its actor is caught by the guard instead.
    actor_opts = dict(max_restarts=p.max_actor_restarts, max_task_retries=-1)
    # Never more actors than videos (each loads the face models once).
    compute = ray.data.ActorPoolStrategy(min_size=min(pool.min_size, len(rows)), max_size=min(pool.max_size, len(rows)))
    guard = dict(timeout_s=p.video_timeout_s, retries=p.max_retries)
    decode = dict(n_pairs=n_pairs, spare=spare, min_gap_seconds=p.min_gap_seconds, seed=p.seed,
                  max_side=p.max_frame_side, probe=_probe_settings(cfg))
    build = dict(n_pairs=n_pairs, min_gap_seconds=p.min_gap_seconds, seed=p.seed, jpeg_quality=p.jpeg_quality,
                 face_cfg=cfg.face)
    face_cfg = cfg.face
    if pool.gpus and face_cfg.backend_device == "cpu":  # actors that hold a GPU run the torch/onnx backends there
        face_cfg = face_cfg.model_copy(update={"backend_device": "cuda"})
    if pool.fused:
        ds = ds.map(PrepareVideos, fn_constructor_args=(face_cfg, backend_factory),
                    fn_constructor_kwargs=dict(decode=decode, build=build, **guard), compute=compute,
                    num_cpus=pool.cpus, num_gpus=pool.gpus or None, **actor_opts)
    else:
        ds = ds.map(_busy("decode", decode_row), fn_kwargs=dict(decode, **guard), num_cpus=pool.task_cpus,
                    **task_opts)
        ds = ds.map_batches(
            AnalyzeFrames, fn_constructor_args=(face_cfg, backend_factory), fn_constructor_kwargs=guard,
            batch_size=1, batch_format="numpy", compute=compute,
            # Fractional CPUs: the pool must never take every CPU, or the decode tasks starve and the job hangs.
            num_cpus=pool.cpus, num_gpus=pool.gpus or None, **actor_opts,
        )
        ds = ds.map(_busy("build", build_samples_row), fn_kwargs=dict(build, backend_factory=backend_factory),
                    num_cpus=pool.task_cpus, **task_opts)

    expected = {url: {v["video_id"] for v in vids} for url, vids in pending.items()}
    buffers: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    futures: list[Future] = []
    busy: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="shard-writer") as writers:
        for row in ds.iter_rows():
            url, vid = row["shard"], row["video_id"]
            busy.update({k: float(row.get(f"busy_{k}") or 0.0) for k in BUSY_STAGES})
            # A retried task may deliver a video twice; the first copy wins, so every sample lands once.
            buffers[url].setdefault(vid, {"report": json.loads(row["report"]), "keys": list(row["keys"]),
                                          "samples": list(row["samples"])})
            if set(buffers[url]) >= expected[url]:
                futures.append(writers.submit(_busy_write, busy, out, lease, url, buffers.pop(url)))
            for f in [f for f in futures if f.done()]:
                futures.remove(f)
                f.result()  # surface write errors early
        for f in futures:
            f.result()
    # Seconds each stage held a worker, summed over workers (bench/prepare.py prints them).
    summary.stage_seconds.update({f"busy_{k}": round(v, 3) for k, v in busy.items()})
    if buffers:
        raise PrepareError(f"stream ended with {len(buffers)} incomplete shard(s): {sorted(buffers)[:3]}")


BUSY_STAGES = ("decode", "analyze", "build", "write")


def _busy(stage: str, fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A row stage that also reports how long it ran (`busy_<stage>`), carrying earlier stages' figures on."""

    def run(row: dict[str, Any], **kw: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = fn(row, **kw)
        for k in BUSY_STAGES:
            if f"busy_{k}" in row:
                out.setdefault(f"busy_{k}", row[f"busy_{k}"])
        out[f"busy_{stage}"] = time.perf_counter() - t0
        return out

    return run


def _busy_write(busy: Counter, ds: Dataset, lease, url: str, videos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        return _write_one(ds, lease, url, videos)
    finally:
        busy["write"] += time.perf_counter() - t0  # Counter updates under the GIL; a rare lost add is harmless


def _probe_settings(cfg: RigFaceConfig) -> dict[str, Any] | None:
    p = cfg.prepare
    if p.face_probe_every_seconds <= 0:
        return None
    # Lenient thresholds: the probe only says where a face is likely (at lower resolution, sizes and scores run
    # lower); the analyzer's own checks decide on each frame.
    return {"every_seconds": p.face_probe_every_seconds, "max_probes": p.face_probe_max, "side": p.face_probe_side,
            "min_confidence": 0.8 * cfg.face.min_confidence, "min_face_size": 0.75 * cfg.face.min_face_size}


def _write_one(ds: Dataset, lease, url: str, videos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    samples = []
    reports = []
    for vid in sorted(videos):
        v = videos[vid]
        reports.append(v["report"])
        samples.extend(zip(v["keys"], v["samples"]))
    return ds.write_shard(url, samples, shard_stats(reports), lease=lease)


def shard_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    video_skips = Counter(r["status"] for r in reports if r["status"])
    frame_skips: Counter[str] = Counter()
    for r in reports:
        frame_skips.update(r.get("frame_skips", {}))
    return {
        "videos": len(reports),
        "videos_ok": sum(1 for r in reports if not r["status"]),
        "video_skips": dict(sorted(video_skips.items())),
        "frames_analyzed": sum(r.get("frames_analyzed", 0) for r in reports),
        "frame_skips": dict(sorted(frame_skips.items())),
        "pairs": sum(r["pairs"] for r in reports),
        "pairs_replaced": sum(r.get("replaced", 0) for r in reports),
        "quality": quality_summary([q for r in reports for q in r.get("quality", [])]),
        # Share of each video's probed frames that showed a face (-1: not probed), and their mean.
        "face_coverage": _mean_coverage(reports),
        "split": reports[0]["split"] if reports else "",
        # Per-video outcome: what --append de-duplicates on and what the index records.
        "video_reports": [{k: r.get(k) for k in ("video_id", "content_hash", "name", "url", "status", "pairs",
                                                 "frame_skips", "n_frames", "fps", "face_coverage")}
                          for r in reports],
    }


def _mean_coverage(reports: list[dict[str, Any]]) -> float | None:
    vals = [float(r["face_coverage"]) for r in reports if float(r.get("face_coverage", -1.0)) >= 0]
    return round(sum(vals) / len(vals), 4) if vals else None


def quality_summary(qualities: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per quality field: count, mean and quantiles over a shard's pairs (the per-pair values are in meta.json)."""
    from rigface.data.quality import QUALITY_FIELDS

    out: dict[str, dict[str, float]] = {}
    for name in QUALITY_FIELDS:
        vals = np.array([q[name] for q in qualities if q.get(name) is not None], dtype=np.float64)
        if vals.size:
            p = np.percentile(vals, [0, 10, 50, 90, 100])
            out[name] = {"count": int(vals.size), "mean": round(float(vals.mean()), 4),
                         **{k: round(float(v), 4) for k, v in zip(("min", "p10", "p50", "p90", "max"), p)}}
    return out
