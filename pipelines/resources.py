"""Sizing Ray work from the `resources` config section and the resources Ray reports.

Pure functions (no Ray import): the jobs pass in `ray.cluster_resources()`; the tests call them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rigface.config import ResourcesConfig


def use_gpus(res: ResourcesConfig, gpus_now: float) -> bool:
    """resources.gpus: on / off, or auto = whether Ray reports any GPU now."""
    return res.gpus == "on" or (res.gpus == "auto" and gpus_now > 0)


@dataclass(frozen=True)
class FacePool:
    """An autoscaling actor pool: min..max actors of `cpus` (and `gpus`) each; `task_cpus` per CPU task."""

    min_size: int
    max_size: int
    cpus: float
    gpus: float
    task_cpus: float

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return (f"{self.min_size}..{self.max_size} face actors x {self.cpus:g} CPU{gpu}; "
                f"CPU tasks {self.task_cpus:g} CPU")


def face_pool(res: ResourcesConfig, cluster: dict[str, float]) -> FacePool:
    """Size prepare's face-analysis pool from what Ray reports (`ray.cluster_resources()`).

    CPU only: one actor per `face_actor_cpus` cores of the CPUs left after `reserve_cpus` (at least one), so
    face analysis, the slowest stage, keeps every core busy while decode and encode tasks (`task_cpus` each)
    always find room. With GPUs: one actor per `face_actor_gpus` share of every GPU, as far as CPUs allow.
    `face_actors_max` caps (or, on an autoscaling cluster whose nodes are not up yet, sets) the maximum.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus_now = float(cluster.get("GPU", 0.0))
    if cpus <= 0:
        raise ValueError("Ray reports no CPU")
    reserve = min(res.reserve_cpus, cpus / 2)  # a 1-CPU box still gives the pool half a CPU
    task_cpus = min(res.task_cpus, reserve) if reserve > 0 else res.task_cpus
    pool_cpus = cpus - reserve
    by_cpu = max(1, math.floor(pool_cpus / res.face_actor_cpus + 0.5))  # nearest: 1.5 CPUs -> 2 actors
    gpu = use_gpus(res, gpus_now)
    if gpu:
        by_gpu = math.floor(gpus_now / res.face_actor_gpus + 1e-9)
        sized = max(1, min(by_cpu, by_gpu))
    else:
        sized = by_cpu
    max_size = res.face_actors_max or sized
    min_size = min(res.face_actors_min, max_size)
    # Logical shares: the sized pool exactly fills the CPUs left after the reserve (Ray counts logical CPUs;
    # each busy actor still runs on a whole core, and the light CPU tasks share the cores with it).
    actor_cpus = min(res.face_actor_cpus, pool_cpus / sized)
    return FacePool(min_size=min_size, max_size=max_size, cpus=round(actor_cpus, 4),
                    gpus=res.face_actor_gpus if gpu else 0.0,
                    task_cpus=round(task_cpus, 4))
