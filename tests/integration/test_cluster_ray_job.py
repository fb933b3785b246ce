"""A real local Ray head with its dashboard, and jobs sent to it the way docs/cluster.md sends them to a cluster:
`ray job submit --address http://HEAD:DASH --runtime-env cluster/runtime_env.yaml -- ...` from the repo root.

The head is started with `ray start --head --block` in its own process group on free loopback ports, and
stopped by signalling that group and then the processes that carry this head's own temp dir. `ray stop` is
not used: it stops every Ray on the machine, including other people's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from procs import free_ports as _free_ports, pids_with as _pids_with  # tests/ is on pythonpath (pyproject)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUNTIME_ENV = "cluster/runtime_env.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _get_json(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class LocalRayHead:
    """`ray start --head` on free loopback ports under a private temp dir; `stop()` ends only what it started."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")  # short: Ray's unix sockets live here
        (gcs, dash, client, node_mgr, obj_mgr, agent_listen, agent_grpc, rt_env, metrics,
         self._spare) = _free_ports(10)
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # Token auth with a token of its own: Ray 2.60 turns auth on when ~/.ray/auth_token exists, so leaving
        # it to chance makes the head's behaviour depend on what else ran on the machine.
        self.token = secrets.token_hex(32)
        self.env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                        PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
            f"--metrics-export-port={metrics}", "--object-store-memory=200000000", f"--temp-dir={self.temp_dir}",
        ]
        self.log = Path(self.temp_dir, "ray-start.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                _get_json(f"{self.dashboard_url}/api/version", self.token)
                return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"Ray dashboard did not answer in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Whatever outlived it (workers, agents) carries this head's private temp dir on its command line.
        deadline = time.monotonic() + 15
        while (left := _pids_with(self.temp_dir)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if not _pids_with(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(self, entrypoint: list[str], submission_id: str) -> subprocess.CompletedProcess:
        """The CLI line docs/cluster.md shows, run from the repo root so working_dir '.' is this checkout."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--submission-id",
               submission_id, "--runtime-env", RUNTIME_ENV, "--no-wait", "--", *entrypoint]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)

    def wait(self, submission_id: str, timeout: float = 300.0) -> tuple[str, str]:
        """Poll the Jobs REST API until the job ends; return its status and logs (stops it on timeout)."""
        url = f"{self.dashboard_url}/api/jobs/{submission_id}"
        deadline = time.monotonic() + timeout
        status = _get_json(url, self.token)["status"]
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(1.0)
            status = _get_json(url, self.token)["status"]
        logs = _get_json(f"{url}/logs", self.token)["logs"]
        if status not in TERMINAL:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.dashboard_url, submission_id],
                           env=self.env, capture_output=True, timeout=60)
        return status, logs


@pytest.fixture(scope="module")
def ray_head():
    head = LocalRayHead(num_cpus=2)
    try:
        head.start()
        yield head
    finally:
        head.stop()
        leftovers = _pids_with(head.temp_dir)
        assert not leftovers, f"Ray processes outlived the test: {leftovers}"


# The job: the driver imports rigface, fans out Ray tasks that write through rigface.data.storage, and records
# where rigface was imported from (it must be the copy runtime_env's working_dir shipped).
STORAGE_JOB = """
import json, sys
import ray
import rigface
from rigface.data import storage

out = sys.argv[1]
ray.init()

@ray.remote(num_cpus=0.5)
def write_part(i):
    import rigface
    from rigface.data import storage
    storage.write_bytes(storage.join(out, f"part-{i}.json"), json.dumps({"i": i, "rigface": rigface.__file__}).encode())
    return i

done = sorted(ray.get([write_part.remote(i) for i in range(4)]))
assert done == [0, 1, 2, 3], done
storage.write_text(storage.join(out, "_SUCCESS.json"),
                   json.dumps({"parts": len(done), "driver_rigface": rigface.__file__, "ray": ray.__version__}))
"""


def test_ray_job_submit_with_the_projects_runtime_env_runs_rigface_code(ray_head, tmp_path):
    out = tmp_path / "job-out"
    sid = f"rigface-storage-{uuid.uuid4().hex[:8]}"
    sub = ray_head.submit(["python", "-c", STORAGE_JOB, str(out)], sid)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"
    status, logs = ray_head.wait(sid)
    assert status == "SUCCEEDED", f"job {sid} ended {status}:\n{logs[-4000:]}"

    summary = json.loads((out / "_SUCCESS.json").read_text())
    import ray

    assert summary["parts"] == 4 and summary["ray"] == ray.__version__
    parts = sorted(json.loads(p.read_text())["i"] for p in out.glob("part-*.json"))
    assert parts == [0, 1, 2, 3]
    # The code ran from the checkout that runtime_env shipped, not from the installed package.
    for path in [summary["driver_rigface"]] + [json.loads(p.read_text())["rigface"] for p in out.glob("part-*")]:
        assert "working_dir_files" in path and not path.startswith(str(REPO)), path


def test_a_failing_job_is_reported_failed(ray_head):
    sid = f"rigface-fail-{uuid.uuid4().hex[:8]}"
    code = "from rigface.data import storage; storage.read_bytes('/nonexistent/rigface/never-there.bin')"
    sub = ray_head.submit(["python", "-c", code], sid)
    assert sub.returncode == 0, sub.stderr
    status, logs = ray_head.wait(sid)
    assert status == "FAILED", logs[-2000:]
    assert "never-there.bin" in logs


def test_rigface_prepare_runs_as_a_ray_job(ray_head, tmp_path):
    """The prepare line of docs/cluster.md, on one tiny real video into a local folder."""
    import media

    videos = tmp_path / "videos"
    media.face_video(videos / "clip.mp4", n_frames=25, fps=10, size=384, scale=1.0)
    out = tmp_path / "shards"
    sid = f"rigface-prepare-{uuid.uuid4().hex[:8]}"
    overrides = {"pairs_per_video": 2, "min_gap_seconds": 1.0, "shard_size": 4, "val_fraction": 0.0}
    argv = ["rigface", *[a for k, v in overrides.items() for a in ("--set", f"prepare.{k}={v}")],
            "prepare", "--source", str(videos), "--output", str(out)]
    sub = ray_head.submit(argv, sid)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"
    status, logs = ray_head.wait(sid, timeout=420)
    assert status == "SUCCEEDED", f"job {sid} ended {status}:\n{logs[-4000:]}"
    shards = sorted(out.rglob("*.tar"))
    stats = sorted(out.rglob("*.stats.json"))
    assert shards and len(stats) == len(shards), (shards, stats)
    pairs = sum(json.loads(s.read_text()).get("pairs", 0) for s in stats)
    assert pairs >= 1, [s.read_text() for s in stats]
    assert (out / "dataset.json").is_file()
