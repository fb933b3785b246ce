"""The local stack is private on a shared machine: every SeaweedFS port it listens on refuses a caller without
credentials, MLflow wants the generated login, and the state folder is readable by its owner only.

Each refusal is paired with the same probe made *with* the credentials, so a probe that could never succeed
(a wrong port, a dead server) fails the test instead of passing it.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import stat
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from rigface.stack import S3_PORT_NAMES

pytestmark = pytest.mark.integration


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state held by `pid`'s open sockets (from /proc, like `ss -ltnp`)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _plain_http(port: int, method: str = "GET", path: str = "/") -> tuple[object, bytes]:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=b"x" if method == "PUT" else None)
        resp = conn.getresponse()
        return resp.status, resp.read(200)
    except (OSError, http.client.HTTPException) as exc:
        return "refused", repr(exc).encode()


def _https(port: int, tls_dir: Path, client_cert: bool, path: str = "/") -> tuple[object, bytes]:
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(str(tls_dir / "node.crt"), str(tls_dir / "node.key"))
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(200)
    except (OSError, http.client.HTTPException) as exc:
        return "refused", repr(exc).encode()


def _grpc(port: int, tls_dir: Path, mode: str) -> str:
    """Call the master's GetMasterConfiguration (an empty request) and return the status code name."""
    import grpc

    if mode == "insecure":
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        ca = (tls_dir / "ca.crt").read_bytes()
        if mode == "cert":
            creds = grpc.ssl_channel_credentials(ca, (tls_dir / "node.key").read_bytes(),
                                                 (tls_dir / "node.crt").read_bytes())
        else:
            creds = grpc.ssl_channel_credentials(ca)
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    call = channel.unary_unary("/master_pb.Seaweed/GetMasterConfiguration",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", timeout=10)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def test_every_seaweedfs_port_refuses_a_caller_without_credentials(stack, s3_prefix):
    info = stack._load_info()
    ports = {name: info.ports[name] for name in S3_PORT_NAMES}
    listening = listening_ports(info.pids["s3"])
    # The ports probed below are exactly the ones the server listens on: a new one would go untested.
    assert listening == set(ports.values()), (sorted(listening), ports)
    tls = stack.tls_dir

    for name, port in ports.items():
        if name == "s3":
            continue
        if name.endswith("_grpc"):
            assert _grpc(port, tls, "insecure") == "UNAVAILABLE", name
            assert _grpc(port, tls, "no-client-cert") == "UNAVAILABLE", name
            # With the stack's client certificate the same call reaches a gRPC server (the master answers it,
            # the others do not serve that method): the refusals above are the TLS layer, not a dead port.
            assert _grpc(port, tls, "cert") == ("OK" if name == "master_grpc" else "UNIMPLEMENTED"), name
        else:
            status, body = _plain_http(port)
            assert status in (400, "refused"), (name, status, body)  # "Client sent an HTTP request to an HTTPS server"
            status, body = _plain_http(port, "PUT", "/rigface-probe/x.txt")
            assert status in (400, "refused"), (name, status, body)
            status, body = _https(port, tls, client_cert=False)
            assert status == "refused" and b"CERTIFICATE_REQUIRED" in body.upper(), (name, status, body)
            status, body = _https(port, tls, client_cert=True)
            assert status != "refused", (name, body)

    # Behind the certificate the filer also wants SeaweedFS's JWT, and the admin UI its login.
    assert _https(ports["filer"], tls, client_cert=True)[0] == 401
    status, body = _https(ports["admin"], tls, client_cert=True)
    assert status in (302, 303, 307) and b"/login" in body, (status, body)

    # The S3 gateway: unsigned requests are refused and change nothing; signed ones work.
    import boto3

    key = f"{s3_prefix.split('/', 3)[3]}/secret.txt"
    client = boto3.client("s3")
    client.put_object(Bucket=stack.bucket, Key=key, Body=b"owner only")
    assert _plain_http(ports["s3"], "GET", f"/{stack.bucket}/{key}")[0] == 403
    assert _plain_http(ports["s3"], "GET", f"/{stack.bucket}?list-type=2")[0] == 403
    assert _plain_http(ports["s3"], "PUT", f"/{stack.bucket}/{key}")[0] == 403
    assert _plain_http(ports["s3"], "DELETE", f"/{stack.bucket}/{key}")[0] == 403
    assert client.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"owner only"
    client.delete_object(Bucket=stack.bucket, Key=key)


def _mlflow_status(uri: str, auth: tuple[str, str] | None) -> int:
    req = urllib.request.Request(uri + "/api/2.0/mlflow/experiments/search?max_results=5")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_wants_the_generated_login(stack):
    env = stack.env()
    uri, user, password = env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24
    assert _mlflow_status(uri, None) == 401
    assert _mlflow_status(uri, (user, password + "x")) == 401
    assert _mlflow_status(uri, ("admin", "password1234")) == 401
    assert _mlflow_status(uri, (user, password)) == 200
    # The artifact proxy (the path to the S3 store through MLflow) is behind the same login.
    req = urllib.request.Request(uri + "/api/2.0/mlflow-artifacts/artifacts")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 401

    # The Python client logs in from the environment the stack exports.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"login-{uuid.uuid4().hex[:8]}")
    assert client.get_experiment(exp).experiment_id == exp


def test_state_folder_is_private(stack):
    root = stack.state
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    loose = []
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            if mode != 0o700:
                loose.append((str(path), oct(mode)))
        elif path.is_file() and mode & 0o077:
            # SeaweedFS writes volume-info (.vif) files 0644 whatever the umask; a new volume made after `up`
            # stays unreadable to others through its 0700 folders.
            if not (path.suffix == ".vif" and stat.S_IMODE(path.parent.stat().st_mode) == 0o700):
                loose.append((str(path), oct(mode)))
    assert not loose, loose
    for name in ("credentials.json", "stack.env", "stack.json", "security.toml", "s3-identities.json",
                 "tls/node.key", "mlflow/mlflow.db", "mlflow/basic_auth.db", "logs/s3.log", "logs/mlflow.log"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    # The unix sockets SeaweedFS opens in /tmp for its own gRPC and HTTP shortcuts: this user only (umask 077).
    info = stack._load_info()
    p = info.ports
    sockets = [Path(f"/tmp/seaweedfs-{kind}-{p[name]}.sock") for kind, name in (
        ("master-grpc", "master_grpc"), ("volume-grpc", "volume_grpc"), ("filer-grpc", "filer_grpc"),
        ("s3-grpc", "s3_grpc"), ("admin-grpc", "admin_grpc"), ("filer", "filer"), ("s3", "s3"))]
    present = [s for s in sockets if s.exists()]
    assert len(present) >= 3, sockets
    for sock in present:
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, (str(sock), oct(sock.stat().st_mode))
    # Secrets never appear on a command line (which any user can read in /proc).
    creds = stack.credentials()
    for pid in info.pids.values():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for value in creds.values():
            if len(value) >= 16:
                assert value not in cmdline
