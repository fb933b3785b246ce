from pipelines.ray_env import forwarded_env
from rigface.config import load_config


def test_forwarded_env_carries_settings_but_never_secrets(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("RIGFACE_TRAIN_FAULT", "rank=1")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["RIGFACE_TRAIN_FAULT"] == "rank=1"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"} & set(env)
    assert "s3cr3t" not in env.values()


def test_forwarded_env_is_empty_on_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://x")
    assert forwarded_env() == {}


def test_storage_config_exports_endpoints_without_overriding_the_user():
    cfg = load_config(overrides=["storage.endpoint_url=http://store:8333", "storage.mlflow_tracking_uri=http://ml:5000"],
                      environ={})
    env: dict[str, str] = {"MLFLOW_TRACKING_URI": "http://users-own"}
    cfg.storage.export_env(env)
    assert env["AWS_ENDPOINT_URL"] == "http://store:8333" == env["MLFLOW_S3_ENDPOINT_URL"]
    assert env["MLFLOW_TRACKING_URI"] == "http://users-own"
    assert env["RIGFACE_S3_RETRY_SECONDS"] == "120.0"


def test_a_local_run_starts_its_own_ray_where_ray_start_runs_one(monkeypatch):
    """`ray start` leaves its address in Ray's temp dir, and `ray.init()` joins that cluster (and refuses
    num_cpus there): a run without RAY_ADDRESS must start a Ray of its own, as sized, and not use someone else's."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import ray

    from pipelines.ray_env import ensure_ray

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    other = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                              "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                              "--node-ip-address=127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        deadline = time.monotonic() + 120
        while not Path(tmp, "ray", "ray_current_cluster").exists():
            assert other.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.5)
        assert not ray.is_initialized()
        ensure_ray(num_cpus=2)
        assert ray.cluster_resources().get("CPU") == 2  # its own; the other cluster has 1
        assert ray.get_runtime_context().gcs_address != f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        os.killpg(other.pid, signal.SIGKILL)  # not `ray stop`: that stops every Ray on the machine
        other.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_local_ray_runs_its_workers_at_the_jobs_priority(monkeypatch):
    """Ray's default +15 leaves a job a few percent of a core beside any busy process at normal priority."""
    import os

    import ray

    from pipelines.ray_env import start_local_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # restored (unset) after the test

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    @ray.remote
    class Actor:
        def niceness(self) -> int:
            return os.nice(0)

    start_local_ray(num_cpus=1)
    try:
        assert ray.get(niceness.remote()) == os.nice(0)
        assert ray.get(Actor.remote().niceness.remote()) == os.nice(0)
    finally:
        ray.shutdown()


def test_a_local_ray_keeps_its_fractional_cpu_workers_between_bursts(monkeypatch, tmp_path):
    """Ray keeps one idle worker per CPU and kills the rest after 1 s idle: prepare's 0.25-CPU tasks then started
    (and imported Ray Data and the face stack in) a new process for most videos."""
    import os
    import time
    from pathlib import Path

    import ray

    from pipelines.ray_env import start_local_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)

    @ray.remote(num_cpus=0.25)
    def together(folder: str, n: int) -> int:
        """Returns once `n` of these run at once (so each burst holds 4 workers)."""
        Path(folder, str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getpid()

    def burst(name: str) -> set[int]:
        folder = tmp_path / name
        folder.mkdir()
        return set(ray.get([together.remote(str(folder), 4) for _ in range(4)]))

    start_local_ray(num_cpus=1)
    try:
        first = burst("first")
        assert len(first) == 4  # four at once on one CPU
        time.sleep(4)  # idle well past Ray's 1 s kill threshold
        assert burst("again") == first  # the same processes: none was killed and started again
    finally:
        ray.shutdown()
