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
    """prepare's face pool: min..max actors of `cpus` (and `gpus`) each.

    fused (CPU only): each actor takes a video from its bytes to encoded samples (decode, face analysis, pair
    conditions and encoding in its watchdog child), so frames never cross a process and no task competes with
    the actors for cores. Otherwise (GPU actors) decode and encode run as CPU tasks of `task_cpus` around them.
    """

    min_size: int
    max_size: int
    cpus: float
    gpus: float
    task_cpus: float
    fused: bool = False

    def describe(self) -> str:
        if self.fused:
            return (f"{self.min_size}..{self.max_size} video actors x {self.cpus:g} CPU "
                    "(decode, face analysis and encoding in one process each)")
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return (f"{self.min_size}..{self.max_size} face actors x {self.cpus:g} CPU{gpu}; "
                f"decode / encode tasks {self.task_cpus:g} CPU")


def face_pool(res: ResourcesConfig, cluster: dict[str, float]) -> FacePool:
    """Size prepare's face pool from what Ray reports (`ray.cluster_resources()`).

    CPU only (face_layout auto): one fused actor per `face_actor_cpus` cores, each taking whole videos, so the
    pool is the job and fills every core. With GPUs (or face_layout staged): one face actor per
    `face_actor_gpus` share of every GPU, as far as the CPUs left after `reserve_cpus` allow, with decode and
    encode tasks (`task_cpus` each) on the rest. The pool starts at the size the resources hold now
    (`face_actors_min` lowers or raises that) and may grow to `face_actors_max`, which on an autoscaling cluster,
    whose nodes are not up yet, sets how far.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus_now = float(cluster.get("GPU", 0.0))
    gpu = use_gpus(res, gpus_now)
    fused = res.face_layout == "fused" or (res.face_layout == "auto" and not gpu)
    if cpus <= 0:  # every worker group at zero: one actor's worth, and the autoscaler adds nodes for the rest
        if not res.face_actors_max:
            raise ValueError("Ray reports no CPU now: on an autoscaling cluster set resources.face_actors_max, so "
                             "the face pool asks for the nodes it needs")
        cpus = res.face_actor_cpus + (0.0 if fused else res.reserve_cpus)
    if fused:
        reserve, task_cpus = 0.0, 0.0
        by_cpu = max(1, math.floor(cpus / res.face_actor_cpus + 1e-9))
    else:
        reserve = min(res.reserve_cpus, cpus / 2)  # a 1-CPU box still gives the pool half a CPU
        task_cpus = min(res.task_cpus, reserve) if reserve > 0 else res.task_cpus
        by_cpu = max(1, math.floor((cpus - reserve) / res.face_actor_cpus + 0.5))  # nearest: 1.5 CPUs -> 2 actors
    sized = max(1, min(by_cpu, math.floor(gpus_now / res.face_actor_gpus + 1e-9))) if gpu else by_cpu
    max_size = res.face_actors_max or sized
    # Start at what the resources hold now: Ray Data's autoscaler grows a pool only while its resource budget
    # allows, and on a 2-CPU node the decode and encode operators' reservations kept it at one actor for a run.
    min_size = min(res.face_actors_min or sized, max_size)
    # Logical shares: the sized pool fits in the CPUs left after the reserve (Ray counts logical CPUs; each busy
    # actor still runs on a whole core, and the light CPU tasks share the cores with it).
    actor_cpus = min(res.face_actor_cpus, (cpus - reserve) / sized)
    return FacePool(min_size=min_size, max_size=max_size, cpus=round(actor_cpus, 4),
                    gpus=res.face_actor_gpus if gpu else 0.0, task_cpus=round(task_cpus, 4), fused=fused)
