"""The demo's building blocks, fast: sample videos from bundled photos, and the demo's config loading."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_sample_portraits_are_distinct_people():
    from rigface.samples import sample_portraits

    portraits = sample_portraits()
    assert len(portraits) >= 2
    for name, img in portraits.items():
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8" and min(img.shape[:2]) >= 256, name


def test_sample_videos_hold_one_face_that_moves_and_is_relit(tmp_path):
    import numpy as np

    from rigface.data.video import Video
    from rigface.face import FaceAnalyzer, FaceFit
    from rigface.face.config import FaceConfig
    from rigface.samples import make_sample_videos

    paths = make_sample_videos(tmp_path / "v", n_videos=3, seconds=2.0, fps=6, size=192)
    assert [p.name for p in paths] == ["astronaut_00.mp4", "grace_hopper_00.mp4", "cameraman_00.mp4"]
    analyzer = FaceAnalyzer(FaceConfig(crop_size=128, min_face_size=48))
    for path in paths:
        with Video(str(path)) as video:
            info = video.info
            assert info.n_frames == 12 and info.fps == pytest.approx(6.0)
            good, failed = video.read_each([0, 6, 11])
        assert not failed and set(good) == {0, 6, 11}
        fits = [analyzer.analyze(good[i]) for i in (0, 6, 11)]
        assert all(isinstance(f, FaceFit) for f in fits), (path.name, fits)
        # Pose and lighting change over the clip: what makes its frame pairs useful for training.
        angles = np.stack([f.pose.angles() for f in fits])
        assert np.ptp(angles[:, 2]) > 2.0, (path.name, angles)  # in-plane roll, degrees
        light = np.stack([np.asarray(f.lighting, np.float64).ravel() for f in fits])
        assert np.abs(light - light[0]).max() > 1e-2, path.name


def test_sample_videos_reject_bad_arguments(tmp_path):
    from rigface.samples import make_sample_videos

    with pytest.raises(ValueError):
        make_sample_videos(tmp_path, n_videos=0)
    with pytest.raises(ValueError):
        make_sample_videos(tmp_path, size=63)
    with pytest.raises(ValueError, match="unknown sample people"):
        make_sample_videos(tmp_path, people=("nobody",))


def test_demo_config_quick_and_overrides():
    from pipelines.demo import load_demo_config
    from rigface.config import ConfigError

    full, budget = load_demo_config()
    quick, qbudget = load_demo_config(quick=True)
    assert full.model.preset == quick.model.preset == "tiny"
    assert full.train.num_workers == quick.train.num_workers == 2
    assert quick.train.max_steps < full.train.max_steps and qbudget.n_videos < budget.n_videos
    cfg, b = load_demo_config(overrides=["train.max_steps=7", "demo.n_videos=5", "storage.bucket=b"])
    assert cfg.train.max_steps == 7 and b.n_videos == 5 and cfg.storage.bucket == "b"
    with pytest.raises(ConfigError):
        load_demo_config(overrides=["demo.no_such_knob=1"])
    with pytest.raises(ConfigError):
        load_demo_config(overrides=["demo.val_videos=9", "demo.n_videos=3"])
    with pytest.raises(ConfigError, match="demo.driver"):
        load_demo_config(overrides=["demo.driver=nobody"])
