"""Join a Ray cluster (RAY_ADDRESS) or start a local one, the same way for every job."""

from __future__ import annotations

import logging
import math
import os
import re
import warnings

from rigface.config import ResourcesConfig
from rigface.redact import has_url_credentials

log = logging.getLogger(__name__)

# Settings workers need to reach the same S3 store and MLflow server as the driver, and our own knobs.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "RIGFACE_")
# Never put these in a runtime_env: Ray keeps runtime_envs in plain text (GCS, dashboard, logs).
SECRET = re.compile(r"SECRET|TOKEN|PASSWORD|SESSION|ACCESS_KEY", re.IGNORECASE)

# Without a terminal Ray Data logs a progress block every 10 s; once a minute keeps CI and job logs readable.
# Read when ray.data is first imported, so it is set here, before any job imports it.
os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")


def forwarded_env() -> dict[str, str]:
    """Non-secret storage/tracking settings for the workers of a *local* Ray.

    A local Ray's workers inherit the driver's environment as it was at ``ray.init`` (credentials included);
    this carries what was set after that (endpoints, test knobs). On a cluster (RAY_ADDRESS set) nodes carry
    their own settings (Secret/ConfigMap, instance profile), and a job whose runtime_env already names one of
    these variables would fail to start if we set it again.
    """
    if os.environ.get("RAY_ADDRESS"):
        return {}
    out = {}
    for k, v in os.environ.items():
        if not k.startswith(FORWARDED_PREFIXES) or not v or SECRET.search(k):
            continue
        if has_url_credentials(v):  # e.g. MLFLOW_TRACKING_URI=https://user:pw@host: workers inherit it instead
            log.warning("not forwarding %s to Ray workers: its value holds URL credentials", k)
            continue
        out[k] = v
    return out


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # KubeRay, the cluster launcher, or `ray start --head`
        return
    # Local: the raylet and its workers inherit this process's environment, so nothing needs forwarding.
    start_local_ray(num_cpus=num_cpus, log_to_driver=True)


def local_node_env(num_cpus: int | None = None) -> dict[str, str]:
    """Ray settings for a node on this machine (start_local_ray; the bench's and tests' extra raylets).

    Worker niceness 0: Ray starts every worker at nice +15, so that on a node of its own the raylet stays
    responsive. Here the node is a machine shared with other work, where +15 leaves a job ~3% of a core against
    any process at normal priority (the training fault tests beside one busy loop per core ran 10x slower). The
    value is relative to the process that starts Ray, so `nice rigface prepare` still lowers the whole job.

    Worker soft limit: Ray keeps one idle worker per CPU and kills the others after 1 s idle; prepare's CPU
    tasks take resources.task_cpus (0.25) each, so up to 4 run per CPU, and a stream with short gaps killed
    and restarted them all the time (each start imports Ray Data and the face stack again: 36 processes for 24
    videos, 1.6x the run time at 1 CPU; bench/prepare.py).
    """
    cpus = num_cpus or os.cpu_count() or 1
    per_cpu = math.ceil(1 / ResourcesConfig().task_cpus)
    return {"RAY_worker_niceness": "0", "RAY_num_workers_soft_limit": str(per_cpu * math.ceil(cpus) + 2)}


def start_local_ray(num_cpus: int | None = None, **init_kwargs) -> None:
    """Start a private Ray on this machine, set up by local_node_env (values the user set win).

    address="local": a new Ray even where `ray start` left its address in Ray's temp dir (a cluster someone else
    runs here, or one long dead); joining one is what RAY_ADDRESS is for.
    """
    import ray

    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("log_to_driver", False)
    added = {k: v for k, v in local_node_env(num_cpus).items() if k not in os.environ}
    os.environ.update(added)  # the raylet (and so every worker) inherits them at init
    try:
        ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
    finally:
        for k in added:
            os.environ.pop(k, None)


def bound_ray_data(stall_timeout_s: float) -> None:
    """Ray Data settings that make every failure end: a stream with no progress for ``stall_timeout_s`` fails
    (an actor pool whose actors are dead for good would otherwise wait for ever: seen with Ray 2.60), actor
    construction errors are not retried, and a block that fails after its bounded retries fails the job."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = stall_timeout_s
    ctx.actor_init_retry_on_errors = False
    ctx.max_errored_blocks = 0
    # Ray 2.60 deprecates **ray_remote_args but has no named parameter for max_retries / max_restarts /
    # max_task_retries yet; those are the bounds, so they stay, without a warning per stage.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
