"""Sizing Ray work from the `resources` section: prepare's face-actor pool and the GPU switch."""

from __future__ import annotations

import pytest

from pipelines.resources import FacePool, face_pool, use_gpus
from rigface.config import ConfigError, ResourcesConfig, load_config


@pytest.mark.parametrize(
    "cpus, gpus, overrides, expected",
    [
        # CPUs only: one fused actor per core, each taking whole videos; the pool starts at that size.
        (2, 0, {}, FacePool(2, 2, 1.0, 0.0, 0.0, True)),
        (1, 0, {}, FacePool(1, 1, 1.0, 0.0, 0.0, True)),
        (16, 0, {}, FacePool(16, 16, 1.0, 0.0, 0.0, True)),
        (3, 0, {"face_actor_cpus": 2.0}, FacePool(1, 1, 2.0, 0.0, 0.0, True)),
        (64, 0, {"face_actor_cpus": 2.0, "face_actors_min": 4}, FacePool(4, 32, 2.0, 0.0, 0.0, True)),
        (8, 0, {"face_actors_min": 20}, FacePool(8, 8, 1.0, 0.0, 0.0, True)),  # min clipped to max
        # The staged layout on CPUs: 0.5 CPU left to decode / encode tasks, two face actors share the other 1.5.
        (2, 0, {"face_layout": "staged"}, FacePool(2, 2, 0.75, 0.0, 0.25, False)),
        (1, 0, {"face_layout": "staged"}, FacePool(1, 1, 0.5, 0.0, 0.25, False)),
        # GPUs present (auto): staged, four actors per GPU, bounded by CPUs too.
        (16, 2, {}, FacePool(8, 8, 1.0, 0.25, 0.25, False)),
        (4, 4, {}, FacePool(4, 4, 0.875, 0.25, 0.25, False)),
        (16, 2, {"gpus": "off"}, FacePool(16, 16, 1.0, 0.0, 0.0, True)),
        (16, 2, {"face_layout": "fused"}, FacePool(8, 8, 1.0, 0.25, 0.0, True)),
        # Autoscaling cluster, GPU nodes at zero now: gpus on + a max the pool may grow to, from one actor.
        (2, 0, {"gpus": "on", "face_actors_max": 8, "face_actor_gpus": 0.5}, FacePool(1, 8, 1.0, 0.5, 0.25, False)),
        # Every worker group at zero (a head with num-cpus 0): one actor's worth now, the rest from the autoscaler.
        (0, 0, {"face_actors_max": 16}, FacePool(1, 16, 1.0, 0.0, 0.0, True)),
        (0, 0, {"gpus": "on", "face_actors_max": 8}, FacePool(1, 8, 1.0, 0.25, 0.25, False)),
    ],
)
def test_face_pool_sizing(cpus, gpus, overrides, expected):
    pool = face_pool(ResourcesConfig(**overrides), {"CPU": float(cpus), "GPU": float(gpus)})
    assert pool == expected
    # Invariants: the sized pool leaves the reserve free for at least one CPU task.
    if not overrides.get("face_actors_max"):
        assert pool.max_size * pool.cpus + pool.task_cpus <= cpus + 1e-6


def test_gpu_switch_and_config_errors():
    assert use_gpus(ResourcesConfig(), 1) and not use_gpus(ResourcesConfig(), 0)
    assert use_gpus(ResourcesConfig(gpus="on"), 0) and not use_gpus(ResourcesConfig(gpus="off"), 8)
    with pytest.raises(ValueError, match="face_actors_max"):
        face_pool(ResourcesConfig(), {"GPU": 1.0})
    # The old per-job switches are gone: one section decides, and a stale key is an error naming it.
    for stale in ("prepare.num_face_actors=2", "train.use_gpu=true", "evaluate.use_gpu=true",
                  "prepare.face_actor_gpus=0.5"):
        with pytest.raises(ConfigError, match=stale.split("=")[0].split(".")[1]):
            load_config(overrides=[stale], environ={})
    cfg = load_config(["configs/train/sd15.yaml"], environ={})
    assert cfg.resources.gpus == "on"
    assert load_config(overrides=["resources.gpus=off"], environ={}).resources.gpus == "off"  # YAML's False
