"""Read, write, list and delete by URL: ``s3://bucket/key`` through boto3, or a plain local path.

S3 uses the standard AWS credential chain and honours ``AWS_ENDPOINT_URL`` (the local stack sets it).
Every S3 call retries transient errors (connection refused while a server restarts, 5xx, throttling)
with exponential backoff, on top of botocore's own retries. Writes are atomic: local files go through
a temp file and ``os.replace``; an S3 PUT is atomic by nature (readers see the old or the new object).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
}


@dataclass(frozen=True)
class URL:
    """A parsed storage URL: scheme 's3' with bucket and key, or scheme 'file' with a path in key."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key

    def join(self, *parts: str) -> "URL":
        if self.scheme == "s3":
            key = "/".join([self.key.rstrip("/")] + [p.strip("/") for p in parts]).lstrip("/")
            return URL("s3", self.bucket, key)
        return URL("file", "", str(Path(self.key, *parts)))


def parse_url(url: str | os.PathLike[str] | URL) -> URL:
    if isinstance(url, URL):
        return url
    text = os.fspath(url)
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket:
            raise ValueError(f"S3 URL without a bucket: {text!r}")
        return URL("s3", bucket, key)
    if text.startswith("file://"):
        text = text[7:]
    if "://" in text:
        raise ValueError(f"unsupported URL scheme in {text!r}: use s3://bucket/key or a local path")
    return URL("file", "", text)


def join(url: str | URL, *parts: str) -> str:
    return str(parse_url(url).join(*parts))


# ---------------------------------------------------------------- S3 client

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None = None, max_attempts: int | None = None):
    """A cached boto3 S3 client per (endpoint, process); credentials come from the standard chain."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    attempts = max_attempts or int(os.environ.get("RIGFACE_S3_MAX_ATTEMPTS", "8"))
    key = (endpoint_url, attempts, os.getpid(), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": attempts, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else {},
                connect_timeout=10,
                read_timeout=120,
                signature_version="s3v4",
            )
            session = boto3.session.Session()
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                config=config,
            )
            _clients[key] = client
    return client


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, BotoConnectionError)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry a storage call on transient S3 errors: up to ~2 minutes of backoff (a restarting server)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        deadline = time.monotonic() + float(os.environ.get("RIGFACE_S3_RETRY_SECONDS", "120"))
        delay = 0.2
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered by _is_transient
                if not _is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("storage: transient error, retrying", extra={"call": fn.__name__, "error": repr(exc)})
                time.sleep(delay * (1 + random.random() * 0.25))
                delay = min(delay * 2, 5.0)

    return wrapper


def _not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
    return False


# ---------------------------------------------------------------- operations


@retrying
def read_bytes(url: str | URL) -> bytes:
    u = parse_url(url)
    if u.scheme == "file":
        return Path(u.key).read_bytes()
    try:
        return s3_client().get_object(Bucket=u.bucket, Key=u.key)["Body"].read()
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(str(u)) from exc
        raise


@retrying
def read_range(url: str | URL, start: int, length: int) -> bytes:
    u = parse_url(url)
    if u.scheme == "file":
        with open(u.key, "rb") as f:
            f.seek(start)
            return f.read(length)
    resp = s3_client().get_object(Bucket=u.bucket, Key=u.key, Range=f"bytes={start}-{start + length - 1}")
    return resp["Body"].read()


def read_text(url: str | URL) -> str:
    return read_bytes(url).decode("utf-8")


@retrying
def write_bytes(url: str | URL, data: bytes) -> None:
    """Write atomically: a reader never sees a partial object."""
    u = parse_url(url)
    if u.scheme == "file":
        path = Path(u.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    s3_client().put_object(Bucket=u.bucket, Key=u.key, Body=data)


def write_text(url: str | URL, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


@retrying
def upload_file(local_path: str | os.PathLike[str], url: str | URL) -> None:
    """Copy a local file to a URL (multipart on S3 for large files; atomic either way)."""
    u = parse_url(url)
    if u.scheme == "file":
        dst = Path(u.key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    s3_client().upload_file(os.fspath(local_path), u.bucket, u.key)


@retrying
def download_file(url: str | URL, local_path: str | os.PathLike[str]) -> None:
    u = parse_url(url)
    dst = Path(local_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if u.scheme == "file":
            with open(u.key, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        else:
            try:
                s3_client().download_file(u.bucket, u.key, tmp)
            except Exception as exc:
                if _not_found(exc):
                    raise FileNotFoundError(str(u)) from exc
                raise
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@retrying
def exists(url: str | URL) -> bool:
    u = parse_url(url)
    if u.scheme == "file":
        return Path(u.key).exists()
    try:
        s3_client().head_object(Bucket=u.bucket, Key=u.key)
        return True
    except Exception as exc:
        if _not_found(exc):
            return False
        raise


@retrying
def size(url: str | URL) -> int:
    u = parse_url(url)
    if u.scheme == "file":
        return Path(u.key).stat().st_size
    return int(s3_client().head_object(Bucket=u.bucket, Key=u.key)["ContentLength"])


def list_urls(prefix: str | URL, suffix: str = "") -> list[str]:
    """Every object (file) under a prefix (folder), recursively, sorted, as full URLs."""
    return sorted(_list(parse_url(prefix), suffix))


@retrying
def _list(u: URL, suffix: str) -> list[str]:
    if u.scheme == "file":
        root = Path(u.key)
        if root.is_file():
            return [str(root)] if str(root).endswith(suffix) else []
        if not root.exists():
            return []
        return [
            str(p) for p in root.rglob("*")
            if p.is_file() and p.name.endswith(suffix) and not p.name.startswith(".")
        ]
    # Folder semantics, as for local paths: s3://b/data lists data/..., never the sibling data-old/...;
    # a URL naming one object lists that object.
    folder = u.key if not u.key or u.key.endswith("/") else u.key + "/"
    out: list[str] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=u.bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(suffix):
                out.append(f"s3://{u.bucket}/{obj['Key']}")
    if not out and u.key and not u.key.endswith("/") and u.key.endswith(suffix) and exists(u):
        out.append(str(u))
    return out


@retrying
def delete(url: str | URL) -> None:
    """Delete one object; deleting what is not there is not an error."""
    u = parse_url(url)
    if u.scheme == "file":
        Path(u.key).unlink(missing_ok=True)
        return
    s3_client().delete_object(Bucket=u.bucket, Key=u.key)


def delete_prefix(prefix: str | URL) -> int:
    """Delete everything under a prefix; returns how many objects went."""
    u = parse_url(prefix)
    urls = list_urls(u)
    if u.scheme == "file":
        for p in urls:
            Path(p).unlink(missing_ok=True)
        return len(urls)
    keys = [parse_url(x).key for x in urls]
    for i in range(0, len(keys), 1000):
        _delete_batch(u.bucket, keys[i : i + 1000])
    return len(keys)


@retrying
def _delete_batch(bucket: str, keys: list[str]) -> None:
    s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})


@retrying
def ensure_bucket(bucket: str) -> None:
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        if not _not_found(exc) and "404" not in repr(exc):
            raise
        client.create_bucket(Bucket=bucket)


def open_read(url: str | URL) -> IO[bytes]:
    """A readable binary stream: a local file, or an S3 body streamed without loading it all."""
    u = parse_url(url)
    if u.scheme == "file":
        return open(u.key, "rb")
    return _open_s3(u)


@retrying
def _open_s3(u: URL) -> IO[bytes]:
    try:
        return s3_client().get_object(Bucket=u.bucket, Key=u.key)["Body"]
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(str(u)) from exc
        raise


def iter_chunks(url: str | URL, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with open_read(url) as f:
        while chunk := f.read(chunk_size):
            yield chunk
