"""Join a Ray cluster (RAY_ADDRESS) or start a local one, the same way for every job."""

from __future__ import annotations

import os

# What workers need to reach the same S3 store and MLflow server as the driver.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "RIGFACE_")


def forwarded_env() -> dict[str, str]:
    """Storage/tracking settings to hand to workers of a *local* Ray.

    On a cluster (RAY_ADDRESS set) nodes carry their own settings (Secret/ConfigMap, instance profile), and a
    job whose runtime_env already names one of these variables would fail to start if we set it again.
    """
    if os.environ.get("RAY_ADDRESS"):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and v}


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # KubeRay, the cluster launcher, or `ray start --head`
        return
    env = forwarded_env()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": env} if env else None)
