"""Issue 12: `prepare` ends on every bad input, with every video accounted for (real local Ray, real decoding).

A test-only face backend takes its process down (``os.abort``) or hangs on one video, recognised by its pixels
(the only gray clip); devices, FIFOs and directories in a manifest are refused before any byte is read.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import media  # tests/ is on pythonpath (pyproject)

from rigface.config import load_config
from rigface.data import dataset

pytestmark = pytest.mark.integration

SIZE = 320
# Every job here must end; how fast depends on the machine's load (these run 5 times in a row beside busy loops
# on every core, tests/soak_faults.sh). A job that retried for ever or hung would pass this bound by far.
ENDS_WITHIN_S = 600


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_env import start_local_ray

    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test backends travel by value
    yield ray
    ray.shutdown()


def cfg(**prepare):
    base = {"pairs_per_video": 2, "min_gap_seconds": 1.0, "shard_size": 4, "val_fraction": 0.0,
            "jpeg_quality": 90, "max_retries": 1}
    base.update(prepare)
    return load_config(overrides=[f"prepare.{k}={v}" for k, v in base.items()] + ["face.multi_face=skip"])


def run(source, output, **kw):
    from pipelines.prepare import run_prepare

    return run_prepare(cfg(**kw.pop("prepare", {})), source=str(source), output=str(output), **kw)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two good colour clips and one gray clip: the culprit the test backends recognise."""
    d = tmp_path_factory.mktemp("clips")
    media.face_video(d / "a.mp4", n_frames=21, fps=10, size=SIZE, scale=1.0)
    media.face_video(d / "b.mp4", n_frames=22, fps=10, size=SIZE, scale=1.05)
    media.face_video(d / "culprit.mp4", n_frames=23, fps=10, size=SIZE, scale=1.0, gray=True)
    return d


def _is_culprit(rgb: np.ndarray) -> bool:
    return int(np.abs(rgb[..., 0].astype(np.int16) - rgb[..., 2]).max()) <= 3


class _Wrapping:
    def __init__(self, face_cfg):
        from pipelines.prepare import FaceBackend

        self.inner = FaceBackend(face_cfg)

    @staticmethod
    def conditions(a, b):
        from pipelines.prepare import FaceBackend

        return FaceBackend.conditions(a, b)


class AbortOnCulprit(_Wrapping):
    """A native crash (SIGABRT, as a decoder assertion gives) on every frame of the culprit."""

    def analyze(self, rgb):
        if _is_culprit(rgb):
            os.abort()
        return self.inner.analyze(rgb)


class ExitOnCulprit(_Wrapping):
    def analyze(self, rgb):
        if _is_culprit(rgb):
            os._exit(3)
        return self.inner.analyze(rgb)


class HangOnCulprit(_Wrapping):
    def analyze(self, rgb):
        if _is_culprit(rgb):
            time.sleep(3600)
        return self.inner.analyze(rgb)


def _accounted(s) -> int:
    return s.videos_ok + sum(s.video_skips.values()) + s.videos_duplicate


@pytest.mark.slow
@pytest.mark.parametrize("backend", [AbortOnCulprit, ExitOnCulprit])
def test_video_that_kills_its_worker_is_a_crashed_skip(ray_local, clips, tmp_path, backend):
    t0 = time.monotonic()
    s = run(clips, tmp_path / "ds", backend_factory=backend, prepare={"max_retries": 1})
    assert time.monotonic() - t0 < ENDS_WITHIN_S
    assert s.video_skips == {"crashed": 1}, s.video_skips
    assert s.videos_ok == 2 and s.pairs == 4 and _accounted(s) == s.videos_listed == 3
    index = dataset.Dataset(str(tmp_path / "ds")).read_index(1)
    by_name = {r["name"]: r for r in index}
    assert by_name["culprit.mp4"]["status"] == "crashed" and by_name["culprit.mp4"]["pairs"] == 0
    keys = [x.key for x in dataset.iter_samples(str(tmp_path / "ds"))]
    assert len(keys) == 4 and not any(k.startswith("culprit") for k in keys)
    assert dataset.validate(str(tmp_path / "ds")).ok


@pytest.mark.slow
def test_hanging_video_is_a_timeout_skip(ray_local, clips, tmp_path):
    t0 = time.monotonic()
    # 45 s: far above a good video's stage time on a loaded box (8 s timed all three out at load 30)
    s = run(clips, tmp_path / "ds", backend_factory=HangOnCulprit, prepare={"video_timeout_s": 45})
    assert time.monotonic() - t0 < ENDS_WITHIN_S
    assert s.video_skips == {"timeout": 1} and s.videos_ok == 2 and s.pairs == 4
    assert _accounted(s) == 3


def test_devices_fifos_directories_and_oversized_sources_are_skips(ray_local, clips, tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    (tmp_path / "folder.mp4").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero-link.mp4")
    manifest = tmp_path / "videos.csv"
    manifest.write_text("path\n" + "\n".join([str(clips / "a.mp4"), "/dev/zero", str(fifo), str(tmp_path / "folder.mp4"),
                                              str(tmp_path / "zero-link.mp4")]) + "\n")
    t0 = time.monotonic()
    s = run(manifest, tmp_path / "ds")
    assert time.monotonic() - t0 < ENDS_WITHIN_S
    assert s.video_skips == {"not_a_file": 4}, s.video_skips
    assert s.videos_ok == 1 and s.pairs == 2 and _accounted(s) == s.videos_listed == 5
    card = dataset.Dataset(str(tmp_path / "ds")).read_card()
    assert card["versions"][-1]["totals"]["video_skips"] == {"not_a_file": 4}

    small = tmp_path / "small.csv"
    small.write_text(f"path\n{clips / 'a.mp4'}\n{clips / 'b.mp4'}\n")
    size_a = (clips / "a.mp4").stat().st_size
    size_b = (clips / "b.mp4").stat().st_size
    s = run(small, tmp_path / "ds2", prepare={"max_video_bytes": min(size_a, size_b)})
    assert size_a != size_b
    assert s.video_skips == {"too_large": 1} and s.videos_ok == 1
