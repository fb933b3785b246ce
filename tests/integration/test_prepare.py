"""`rigface prepare` end to end on a real local Ray with the real face analysis (embedded backends)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import media  # tests/ is on pythonpath (pyproject)

from pipelines.resources import FacePool, face_pool
from rigface.config import load_config
from rigface.data import dataset, schema, storage
from rigface.data.dataset import Dataset

pytestmark = pytest.mark.integration

SIZE = 384  # the astronaut's face is ~90 px here: above face.min_face_size


@pytest.fixture(scope="module")
def ray_local(stack):
    # The stack first: Ray's workers inherit the S3 endpoint and credentials from the environment at init.
    import ray

    from pipelines.ray_env import start_local_ray

    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray
    ray.shutdown()


def cfg(**prepare):
    base = {"pairs_per_video": 2, "min_gap_seconds": 1.0, "shard_size": 4, "val_fraction": 0.0,
            "jpeg_quality": 90}
    base.update(prepare)
    return load_config(overrides=[f"prepare.{k}={v}" for k, v in base.items()] + ["face.multi_face=skip"])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Good clips plus every bad input of issue 5, in one source folder (one path with spaces and unicode)."""
    d = tmp_path_factory.mktemp("videos")
    good = [media.face_video(d / "clip a.mp4", n_frames=25, fps=10, size=SIZE, scale=1.0),
            media.face_video(d / "vidéo été" / "b.mp4", n_frames=26, fps=10, size=SIZE, scale=1.0),
            media.face_video(d / "gray.mkv", n_frames=22, fps=10, size=SIZE, scale=1.0, gray=True, codec="ffv1")]
    media.bad_inputs(d / "bad", good[0])
    media.face_video(d / "bad" / "noface.mp4", n_frames=22, fps=10, size=SIZE, faces=0)
    media.face_video(d / "bad" / "twofaces.mp4", n_frames=22, fps=10, size=SIZE, faces=2)
    media.face_video(d / "bad" / "tiny.mp4", n_frames=22, fps=10, size=SIZE, scale=0.12)
    media.face_video(d / "bad" / "short.mp4", n_frames=6, fps=10, size=SIZE, scale=1.0)
    big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(media.scene(SIZE, scale=1.0)).resize(
        (2400, 2400)))
    media.write_video(d / "huge.mp4", [big] * 12, fps=10)
    return d


def run(source, output, **kw):
    from pipelines.prepare import run_prepare

    return run_prepare(cfg(**kw.pop("prepare", {})), source=str(source), output=str(output), **kw)


def test_prepare_bad_inputs_resume_and_append(ray_local, videos, tmp_path):
    out = tmp_path / "ds"
    s = run(videos, out, prepare={"max_frame_side": 1024})
    # Every video is accounted for: good ones give pairs, every bad one is a recorded skip with its reason.
    assert s.videos_listed == 13
    assert s.pairs >= 6 and s.videos_ok >= 3
    skips = s.video_skips
    # no_face: the decode stage's face probe found none (the face-less clip, and the one too small to take).
    for reason in ("empty", "unreadable", "no_video_stream", "too_short", "no_face"):
        assert skips.get(reason, 0) >= 1, (reason, skips)
    assert "several_faces" in s.frame_skips or "low_confidence" in s.frame_skips
    index = [json.loads(x) for x in (out / "index" / "v001.jsonl").read_text().splitlines()]
    by_name = {r["name"]: r for r in index}
    assert by_name["bad/zero.mp4"]["status"] == "empty"
    assert by_name["bad/audio.mp4"]["status"] == "no_video_stream"
    assert by_name["bad/short.mp4"]["status"] == "too_short"
    assert by_name["bad/twofaces.mp4"]["frame_skips"].get("several_faces", 0) > 0
    assert by_name["bad/tiny.mp4"]["status"] == "no_face" and by_name["bad/noface.mp4"]["status"] == "no_face"
    assert by_name["bad/noface.mp4"]["face_coverage"] == 0.0 and by_name["huge.mp4"]["face_coverage"] == 1.0
    assert by_name["huge.mp4"]["pairs"] > 0 and by_name["gray.mkv"]["pairs"] > 0
    assert by_name["vidéo été/b.mp4"]["pairs"] > 0

    # The shards pass the validator and read back with plain webdataset and with Ray Data.
    report = dataset.validate(str(out))
    assert report.ok, report.faults
    assert report.samples == s.pairs
    samples = list(dataset.iter_samples(str(out)))
    assert len(samples) == s.pairs and len({x.key for x in samples}) == s.pairs
    x = samples[0]
    assert x.source.shape == (512, 512, 3) and x.render.shape == (512, 512, 3)
    assert x.render.max() > 0 and x.mask_target.max() == 255 and x.expression.dtype == np.float32
    assert abs(x.meta["frames"][0] - x.meta["frames"][1]) >= 10  # min_gap 1 s at 10 fps
    import ray

    tars = Dataset(str(out)).shard_urls()
    rds = ray.data.read_webdataset(tars, decoder=False).take_all()
    assert len(rds) == s.pairs

    card = json.loads((out / "dataset.json").read_text())
    assert card["latest"] == 1 and card["totals"]["pairs"] == s.pairs
    assert card["versions"][0]["content_hash"] == s.content_hash

    # Interrupted run: lose the last shard's commit marker and another shard entirely, then rerun.
    before = {p.name: p.read_bytes() for p in out.rglob("*.tar")}
    stats_files = sorted(out.rglob("*.stats.json"))
    assert len(stats_files) >= 2
    stats_files[-1].unlink()
    stats_files[0].unlink()
    Path(str(stats_files[0]).replace(".stats.json", ".tar")).unlink()
    (out / "dataset.json").unlink()
    again = run(videos, out, prepare={"max_frame_side": 1024})
    assert again.shards_resumed == s.shards_planned - 2 and again.shards_written == 2
    after = {p.name: p.read_bytes() for p in out.rglob("*.tar")}
    assert after == before  # same shards, byte for byte: same samples, none twice
    assert again.content_hash == s.content_hash

    # A rerun of a finished dataset does nothing; a different source without --append is refused.
    assert run(videos, out, prepare={"max_frame_side": 1024}).shards_written == 0
    new_src = tmp_path / "new"
    media.face_video(new_src / "c.mp4", n_frames=27, fps=10, size=SIZE, scale=1.0)
    shutil.copy(videos / "clip a.mp4", new_src / "copy of a.mp4")  # already in the dataset
    from pipelines.prepare import PrepareError

    with pytest.raises(PrepareError, match="--append"):
        run(new_src, out)
    # --append: new shards for the new video only, old shards untouched, a new card version.
    app = run(new_src, out, append=True)
    assert app.version == 2 and app.videos_duplicate == 1 and app.videos_planned == 1 and app.pairs >= 1
    assert {p.name: p.read_bytes() for p in out.rglob("shard-v001-*.tar")} == before
    card = json.loads((out / "dataset.json").read_text())
    assert card["latest"] == 2 and [v["version"] for v in card["versions"]] == [1, 2]
    assert card["versions"][1]["sources"][0]["source"] == str(new_src)
    assert card["versions"][1]["sources"][0]["videos_duplicate"] == 1
    assert card["totals"]["pairs"] == s.pairs + app.pairs
    assert dataset.validate(str(out)).samples == s.pairs + app.pairs


class KillOnce:
    """Face backend that kills its actor process the first time (a marker file remembers), then works."""

    marker: str = ""

    def __init__(self, face_cfg):
        from pipelines.prepare import FaceBackend

        self.inner = FaceBackend(face_cfg)
        self.calls = 0

    def analyze(self, rgb):
        self.calls += 1
        if self.calls == 3 and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)  # the actor dies mid-video
        return self.inner.analyze(rgb)

    conditions = staticmethod(lambda a, b: __import__("pipelines.prepare", fromlist=["x"]).FaceBackend.conditions(a, b))


def test_actor_killed_mid_run_every_sample_once(ray_local, tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        media.face_video(src / f"v{i}.mp4", n_frames=22 + i, fps=10, size=SIZE, scale=1.0)
    marker = tmp_path / "killed"
    KillOnce.marker = str(marker)  # travels with the class, pickled by value
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    killed = run(src, tmp_path / "k", backend_factory=KillOnce)
    assert marker.exists()
    clean = run(src, tmp_path / "c")
    assert killed.pairs == clean.pairs == 6
    keys_k = sorted(x.key for x in dataset.iter_samples(str(tmp_path / "k")))
    keys_c = sorted(x.key for x in dataset.iter_samples(str(tmp_path / "c")))
    assert keys_k == keys_c and len(set(keys_k)) == len(keys_k)
    assert killed.content_hash == clean.content_hash


def test_schema_key_safety_in_output(ray_local, videos, tmp_path):
    # A source folder whose own path holds spaces and unicode: ids are tar-safe and carry the content hash.
    out = tmp_path / "ds"
    s = run(videos / "vidéo été", out)
    assert s.pairs == 2
    for x in dataset.iter_samples(str(out)):
        vid, a, b = schema.parse_key(x.key)
        assert vid.startswith("b-") and x.meta["source_name"] == "b.mp4" and x.meta["content_hash"][:10] in vid


def test_prepare_to_s3_reads_back(ray_local, stack, s3_prefix, tmp_path):
    """Shards on the real local S3 server: written through storage, read by webdataset (s3 handler) and Ray."""
    src = tmp_path / "src"
    media.face_video(src / "a.mp4", n_frames=23, fps=10, size=SIZE, scale=1.0)
    s = run(src, s3_prefix)
    assert s.pairs == 2
    assert dataset.validate(s3_prefix).ok
    assert len(list(dataset.iter_samples(s3_prefix))) == 2
    import ray

    fs, path = storage.pyarrow_filesystem(s3_prefix)
    tars = Dataset(s3_prefix).shard_urls()
    rows = ray.data.read_webdataset([storage.pyarrow_filesystem(t)[1] for t in tars], filesystem=fs,
                                    decoder=False).take_all()
    assert len(rows) == 2


def test_s3_store_restarted_mid_run_writes_retry(ray_local, stack, s3_prefix, tmp_path):
    """The S3 server crashes while the job runs and comes back: the storage layer's retries carry the run through."""
    import threading
    import time

    src = tmp_path / "src"
    media.face_video(src / "a.mp4", n_frames=23, fps=10, size=SIZE, scale=1.0)
    media.face_video(src / "b.mp4", n_frames=24, fps=10, size=SIZE, scale=1.1)
    stack.kill_s3()  # down before the first listing/write: every S3 call of the run must wait and retry
    result: dict = {}

    def job():
        try:
            result["summary"] = run(src, s3_prefix)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    t = threading.Thread(target=job)
    t.start()
    time.sleep(8)
    assert t.is_alive(), f"the run ended while S3 was down: {result}"
    stack.start_s3()
    t.join(timeout=600)  # ~1 min idle; the soak (busy loops on both cores) stretched it past 240 s at load 28
    assert not t.is_alive(), "the run did not end within 600 s of S3 coming back"
    assert "error" not in result, result.get("error")
    assert result["summary"].pairs == 4
    report = dataset.validate(s3_prefix)
    assert report.ok and report.samples == 4, report.faults


class PidBackend:
    """The real face backend; each instance (one per pool actor) leaves its process id in a folder."""

    pid_dir: str = ""

    def __init__(self, face_cfg):
        from pipelines.prepare import FaceBackend

        self.inner = FaceBackend(face_cfg)
        Path(self.pid_dir, str(os.getpid())).write_text("")

    def analyze(self, rgb):
        return self.inner.analyze(rgb)

    conditions = staticmethod(lambda a, b: __import__("pipelines.prepare", fromlist=["x"]).FaceBackend.conditions(a, b))


@pytest.mark.parametrize("layout, expected", [
    ("auto", FacePool(2, 2, 1.0, 0.0, 0.0, True)),       # CPUs: an actor per core takes whole videos
    ("staged", FacePool(2, 2, 0.75, 0.0, 0.25, False)),  # how GPU nodes run: decode / encode tasks around the pool
])
def test_face_pool_sized_from_the_resources_ray_reports(ray_local, tmp_path, layout, expected):
    """2 CPUs reported -> a pool of 2 actors from the start (Ray Data's autoscaler had kept it at one for a whole
    run), each building its face backend once; in the staged layout the decode and encode tasks still run."""
    import ray
    import ray.cloudpickle

    from pipelines.prepare import run_prepare

    c = load_config(overrides=["prepare.pairs_per_video=2", "prepare.shard_size=4", "prepare.val_fraction=0.0",
                               "prepare.min_gap_seconds=1.0", f"resources.face_layout={layout}"])
    assert face_pool(c.resources, ray.cluster_resources()) == expected
    src = tmp_path / "src"
    for i in range(4):
        media.face_video(src / f"v{i}.mp4", n_frames=22 + i, fps=10, size=SIZE, scale=1.0)
    pids = tmp_path / "pids"
    pids.mkdir()
    PidBackend.pid_dir = str(pids)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    s = run_prepare(c, source=str(src), output=str(tmp_path / "out"), backend_factory=PidBackend)
    assert s.pairs == 8
    assert len(list(pids.iterdir())) == 2
    # Each stage reports the seconds it held a worker (bench/prepare.py prints them).
    assert all(s.stage_seconds[f"busy_{k}"] > 0 for k in ("decode", "analyze", "build", "write")), s.stage_seconds


@pytest.mark.slow
def test_a_video_added_to_the_source_is_refused_without_append_and_planned_once_with_it(ray_local, tmp_path):
    from pipelines.prepare import PrepareError

    src, out = tmp_path / "src", tmp_path / "ds"
    for i in range(2):
        media.face_video(src / f"v{i}.mp4", n_frames=22 + i, fps=10, size=SIZE, scale=1.0)
    first = run(src, out)
    assert first.pairs == 4
    tars = {p.name: p.read_bytes() for p in out.rglob("*.tar")}
    media.face_video(src / "v2.mp4", n_frames=24, fps=10, size=SIZE, scale=1.0)
    # Without --append: the committed plan differs from the listing, so nothing is (re)written.
    with pytest.raises(PrepareError, match=r"1 video\(s\) not in the plan: \['v2.mp4'\].*--append"):
        run(src, out)
    with pytest.raises(PrepareError, match="settings that shape samples changed.*pairs_per_video"):
        run(src, out, prepare={"pairs_per_video": 3})
    assert {p.name: p.read_bytes() for p in out.rglob("*.tar")} == tars
    # With --append: the new video only, as version 2; every video's pairs exactly once.
    app = run(src, out, append=True)
    assert app.version == 2 and app.videos_planned == 1 and app.videos_duplicate == 2 and app.pairs == 2
    samples = list(dataset.iter_samples(str(out)))
    assert len(samples) == 6 and len({x.key for x in samples}) == 6
    assert Counter(x.meta["source_name"] for x in samples) == {"v0.mp4": 2, "v1.mp4": 2, "v2.mp4": 2}
    assert run(src, out).shards_written == 0  # version 2 is done; a plain rerun resumes (nothing to do)


def test_overwrite_refuses_a_folder_holding_other_files_and_a_bucket_root(ray_local, stack, tmp_path):
    from pipelines.prepare import PrepareError

    src = tmp_path / "videos"
    media.face_video(src / "a.mp4", n_frames=22, fps=10, size=SIZE, scale=1.0)
    with pytest.raises(PrepareError, match="not part of a dataset"):
        run(src, tmp_path, overwrite=True)  # the source videos live in the output folder
    assert (src / "a.mp4").exists()
    with pytest.raises(PrepareError, match="bucket"):
        run(src, f"s3://{stack.bucket}", overwrite=True)
    assert not storage.exists(f"s3://{stack.bucket}/lease.json")


def test_two_runs_on_one_output_the_second_fails_fast_naming_the_holder(ray_local, stack, s3_prefix, tmp_path):
    import threading
    import time

    from pipelines.prepare import PrepareError

    src = tmp_path / "src"
    media.face_video(src / "a.mp4", n_frames=23, fps=10, size=SIZE, scale=1.0)
    result: dict = {}

    def job():
        try:
            result["summary"] = run(src, s3_prefix)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    t = threading.Thread(target=job)
    t.start()
    lease = Dataset(s3_prefix).lease_url
    deadline = time.monotonic() + 120
    while not storage.exists(lease) and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert storage.exists(lease), result
    t0 = time.monotonic()
    with pytest.raises(PrepareError, match="held by 'rigface prepare"):
        run(src, s3_prefix, append=True)
    assert time.monotonic() - t0 < 15
    t.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["summary"].pairs == 2
    report = dataset.validate(s3_prefix)  # shards and their stats files agree (count and sha256)
    assert report.ok and report.samples == 2, report.faults
    assert not storage.exists(lease)
