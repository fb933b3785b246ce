"""Benchmark of `rigface prepare` on this machine. Prints one table.

- pairs/s end to end, and the share of time per stage (from the stage timers in each Ray task);
- decode: the pipeline's Video.read_each against a plain sequential decord read of the same frames (ratio);
- 1 versus 2 worker CPUs (scaling ratio of end-to-end pairs/s);
- shard write: rigface.data.shards.write_shard against a raw boto3 put_object of the same bytes (ratio), on the
  local S3 stack when it is up (`rigface stack up`), else against a local write_bytes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import media  # noqa: E402

from rigface.config import load_config  # noqa: E402

N_VIDEOS = int(os.environ.get("BENCH_VIDEOS", "6"))


def make_videos(d: Path) -> Path:
    for i in range(N_VIDEOS):
        media.face_video(d / f"v{i}.mp4", n_frames=30 + i, fps=10, size=384, scale=1.0)
    return d


def e2e(src: Path, out: Path, cpus: int) -> tuple[float, object]:
    import ray

    from pipelines.prepare import run_prepare

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    cfg = load_config(overrides=["prepare.pairs_per_video=4", "prepare.shard_size=8", "prepare.val_fraction=0",
                                 f"prepare.num_face_actors={max(1, cpus - 1)}", "prepare.face_actor_cpus=0.5"])
    try:
        t = time.perf_counter()
        s = run_prepare(cfg, source=str(src), output=str(out))
        return time.perf_counter() - t, s
    finally:
        ray.shutdown()


def decode_ratio(src: Path) -> tuple[float, float]:
    import decord

    from rigface.data.sampling import frames_of, sample_distant_pairs
    from rigface.data.video import Video

    paths = sorted(src.glob("*.mp4"))
    t = time.perf_counter()
    for p in paths:
        with Video(p) as v:
            v.read_each(frames_of(sample_distant_pairs(v.info.n_frames, v.info.fps, 6, 1.0, salt=p.name)))
    ours = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        vr = decord.VideoReader(str(p))
        idx = frames_of(sample_distant_pairs(len(vr), vr.get_avg_fps(), 6, 1.0, salt=p.name))
        for i in idx:
            vr[i].asnumpy()
    plain = time.perf_counter() - t
    return ours, plain


def write_ratio(tmp: Path) -> tuple[str, float, float, int]:
    import numpy as np

    from rigface.data import shards, storage

    blob = np.random.default_rng(0).integers(0, 255, 48 << 20, dtype=np.uint8).tobytes()
    # One ~48 MB shard as 32 samples of raw bytes in valid tar records.
    from rigface.data.schema import pack_sample, MEMBERS
    step = len(blob) // 32
    samples = []
    for i in range(32):
        members = {m: b"" for m in MEMBERS}
        members["source.jpg"] = blob[i * step:(i + 1) * step]
        key = f"bench/{i:06d}-{i + 10:06d}"
        samples.append((key, pack_sample(key, members)))
    data = shards.finish_tar(b for _, b in samples)
    s3 = bool(os.environ.get("AWS_ENDPOINT_URL"))
    base = "s3://rigface/bench-prepare" if s3 else str(tmp / "w")
    if s3:
        storage.ensure_bucket("rigface")
    t = time.perf_counter()
    shards.write_shard(storage.join(base, "a.tar"), samples)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    if s3:
        storage.s3_client().put_object(Bucket="rigface", Key="bench-prepare/raw.tar", Body=data)
    else:
        Path(base, "raw.tar").write_bytes(data)
    raw = time.perf_counter() - t
    if s3:
        storage.delete_prefix(base)
    return ("S3 (local stack)" if s3 else "local disk"), ours, raw, len(data)


def main() -> None:
    from rigface.stack import apply_stack_env

    apply_stack_env(".rigface")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_videos(tmp / "src")
        rows = []
        t1, s1 = e2e(src, tmp / "o1", 1)
        t2, s2 = e2e(src, tmp / "o2", 2)
        p1, p2 = s1.pairs / t1, s2.pairs / t2
        rows.append(("end to end, 2 CPUs", f"{s2.pairs} pairs in {t2:.1f} s", f"{p2:.2f} pairs/s"))
        rows.append(("end to end, 1 CPU", f"{s1.pairs} pairs in {t1:.1f} s", f"{p1:.2f} pairs/s"))
        rows.append(("scaling 2 vs 1 CPU", "", f"x{p2 / p1:.2f}"))
        for stage, sec in s2.stage_seconds.items():
            rows.append((f"stage share: {stage}", f"{sec:.1f} s", f"{100 * sec / t2:.0f} %"))
        ours, plain = decode_ratio(src)
        rows.append(("decode (ours / plain decord loop)", f"{ours:.2f} s / {plain:.2f} s", f"x{ours / plain:.2f}"))
        where, w_ours, w_raw, n = write_ratio(tmp)
        rows.append((f"shard write {n >> 20} MB, {where}", f"{w_ours:.2f} s / raw {w_raw:.2f} s",
                     f"x{w_ours / w_raw:.2f} ({n / w_ours / 1e6:.0f} MB/s)"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'detail':<28}  figure")
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:<28}  {c}")


if __name__ == "__main__":
    main()
