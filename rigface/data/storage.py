"""Read, write, list and delete by URL: ``s3://bucket/key`` through boto3, or a plain local path.

S3 uses the standard AWS credential chain and honours ``AWS_ENDPOINT_URL`` (the local stack sets it).
boto3 (the maintained AWS SDK) does the protocol; this module adds exactly one retry policy on top of it
(botocore's own retries are switched off, so attempts never multiply): transient errors (connection refused
while a server restarts, 5xx, throttling, a connection that drops mid-body) are retried with capped
exponential backoff until ``RIGFACE_S3_RETRY_SECONDS`` (storage.retry_seconds) have passed. A streamed read
that fails part-way reopens at the byte it had reached (a Range GET pinned to the object's ETag), so a
reader never silently loses the rest of an object. Writes are atomic: local files go through a temp file and
``os.replace``; an S3 PUT is atomic by nature (readers see the old or the new object).
"""

from __future__ import annotations

import functools
import io
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


def s3_client(endpoint_url: str | None = None):
    """A cached boto3 S3 client per (endpoint, process); credentials come from the standard chain."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (endpoint_url, os.getpid(), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                # One retry policy (``retrying`` below): botocore makes a single attempt per call.
                retries={"total_max_attempts": 1, "mode": "standard"},
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
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, BotoConnectionError,
                        IncompleteReadError, ResponseStreamingError, Urllib3Error)):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return err.get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """The one retry policy: transient S3 errors are retried with capped backoff for up to
    ``RIGFACE_S3_RETRY_SECONDS`` (default 120 s: long enough for a restarting server)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        backoff = Backoff(fn.__name__)
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered by _is_transient
                backoff.wait_or_raise(exc)

    return wrapper


class Backoff:
    """State of one retried operation: re-raises a permanent error or one past the deadline, else sleeps."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.deadline = time.monotonic() + float(os.environ.get("RIGFACE_S3_RETRY_SECONDS", "120"))
        self.delay = 0.2

    def wait_or_raise(self, exc: BaseException) -> None:
        if not _is_transient(exc) or time.monotonic() + self.delay > self.deadline:
            raise exc
        log.warning("storage: transient error, retrying", extra={"call": self.what, "error": repr(exc)})
        time.sleep(self.delay * (1 + random.random() * 0.25))
        self.delay = min(self.delay * 2, 5.0)


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


def missing_from(local_dir: str | os.PathLike[str], url: str | URL) -> list[str]:
    """Paths (relative, '/'-separated) of the files under ``local_dir`` that the folder ``url`` it was copied to
    lacks or holds at another size. For copies made by other code (Ray Train's pyarrow upload of a checkpoint)
    that we must not take on trust: a store under load has lost files of such a copy here."""
    root = Path(local_dir)
    base = str(url).rstrip("/")
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if _size_or_none(f"{base}/{rel}") != p.stat().st_size:
            out.append(rel)
    return out


def _size_or_none(url: str) -> int | None:
    """The object's size, None where there is none: one HEAD, not exists() and then size()."""
    try:
        return size(url)
    except FileNotFoundError:
        return None
    except Exception as exc:
        if _not_found(exc):
            return None
        raise


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
    """Delete everything under a prefix (folder); returns how many objects went. Raises naming every
    object that could not be deleted."""
    urls = list_urls(prefix)
    failed = delete_many(urls)
    if failed:
        raise OSError(f"{len(failed)} object(s) under {prefix} could not be deleted: "
                      + "; ".join(f"{k} ({v})" for k, v in sorted(failed.items())))
    return len(urls)


def delete_many(urls: list[str]) -> dict[str, str]:
    """Delete the given objects; returns ``{url: error}`` for every one that could not be deleted
    (an object already gone is not an error)."""
    failed: dict[str, str] = {}
    by_bucket: dict[str, list[str]] = {}
    for url in urls:
        u = parse_url(url)
        if u.scheme == "file":
            try:
                Path(u.key).unlink(missing_ok=True)
            except OSError as exc:
                failed[url] = f"{type(exc).__name__}: {exc}"
        else:
            by_bucket.setdefault(u.bucket, []).append(u.key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            try:
                errors = _delete_batch(bucket, keys[i: i + 1000])
            except Exception as exc:  # noqa: BLE001 - reported per key, never ignored
                errors = [{"Key": k, "Code": type(exc).__name__, "Message": str(exc)} for k in keys[i: i + 1000]]
            for e in errors:
                failed[f"s3://{bucket}/{e.get('Key')}"] = f"{e.get('Code')}: {e.get('Message')}"
    return failed


@retrying
def _delete_batch(bucket: str, keys: list[str]) -> list[dict]:
    resp = s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    return list(resp.get("Errors", []))


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
    """A readable binary stream: a local file, or an S3 body streamed without loading it all, which
    resumes at the byte it had reached when the connection fails part-way (see ResumableS3Stream)."""
    u = parse_url(url)
    if u.scheme == "file":
        return open(u.key, "rb")
    return ResumableS3Stream(u)


def _get_body(u: URL, start: int, etag: str | None):
    """One GET from ``start`` (pinned to ``etag`` once known): (body, etag). Tests wrap this to inject faults."""
    kwargs: dict = {"Bucket": u.bucket, "Key": u.key}
    if start:
        kwargs["Range"] = f"bytes={start}-"
    if etag:
        kwargs["IfMatch"] = etag
    resp = s3_client().get_object(**kwargs)
    return resp["Body"], resp.get("ETag")


class ResumableS3Stream(io.RawIOBase):
    """A read-only stream over one S3 object. A transient error while opening or in the middle of the body is
    retried under the module's one policy by reopening at the current offset; the ETag of the first response
    pins the object, so a resumed read can never splice two versions of it (that is a PreconditionFailed)."""

    def __init__(self, u: URL) -> None:
        self.url = u
        self.pos = 0
        self.etag: str | None = None
        self._body = None
        self._open(Backoff(f"open {u}"))

    def _open(self, backoff: Backoff) -> None:
        while True:
            try:
                self._body, etag = _get_body(self.url, self.pos, self.etag)
                self.etag = self.etag or etag
                return
            except Exception as exc:  # noqa: BLE001 - filtered by the policy
                if _not_found(exc):
                    raise FileNotFoundError(str(self.url)) from exc
                if self.pos and _range_past_end(exc):
                    self._body = io.BytesIO(b"")
                    return
                backoff.wait_or_raise(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        backoff: Backoff | None = None
        while True:
            try:
                data = self._body.read(len(buffer))
                break
            except Exception as exc:  # noqa: BLE001 - filtered by the policy
                backoff = backoff or Backoff(f"read {self.url} at {self.pos}")
                backoff.wait_or_raise(exc)
                log.warning("storage: read failed at byte %d of %s; reopening there", self.pos, self.url)
                self._close_body()
                self._open(backoff)
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def _close_body(self) -> None:
        try:
            if self._body is not None:
                self._body.close()
        except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
            pass
        self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def _range_past_end(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "InvalidRange"


@retrying
def create_exclusive(url: str | URL, data: bytes) -> bool:
    """Write an object only if none exists (S3 ``If-None-Match: *``; O_EXCL locally). True when this call
    created it, False when one was there already."""
    u = parse_url(url)
    if u.scheme == "file":
        path = Path(u.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        s3_client().put_object(Bucket=u.bucket, Key=u.key, Body=data, IfNoneMatch="*")
        return True
    except Exception as exc:
        if _precondition_failed(exc):
            return False
        raise


@retrying
def read_with_etag(url: str | URL) -> tuple[bytes, str]:
    """The object's bytes and a version tag (S3 ETag; inode and mtime locally) for ``replace_if``."""
    u = parse_url(url)
    if u.scheme == "file":
        path = Path(u.key)
        return path.read_bytes(), _local_tag(path)
    try:
        resp = s3_client().get_object(Bucket=u.bucket, Key=u.key)
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(str(u)) from exc
        raise
    return resp["Body"].read(), resp["ETag"]


@retrying
def replace_if(url: str | URL, data: bytes, etag: str) -> bool:
    """Overwrite the object only if it is still the version ``etag`` names (S3 ``If-Match``); False if not.
    Locally the check and the replace are two steps (a local folder has one writer machine)."""
    u = parse_url(url)
    if u.scheme == "file":
        path = Path(u.key)
        if not path.exists() or _local_tag(path) != etag:
            return False
        write_bytes(url, data)
        return True
    try:
        s3_client().put_object(Bucket=u.bucket, Key=u.key, Body=data, IfMatch=etag)
        return True
    except Exception as exc:
        if _precondition_failed(exc) or _not_found(exc):
            return False
        raise


@retrying
def delete_if(url: str | URL, etag: str) -> bool:
    """Delete the object only if it is still the version ``etag`` names."""
    u = parse_url(url)
    if u.scheme == "file":
        path = Path(u.key)
        if not path.exists() or _local_tag(path) != etag:
            return False
        path.unlink(missing_ok=True)
        return True
    try:
        s3_client().delete_object(Bucket=u.bucket, Key=u.key, IfMatch=etag)
        return True
    except Exception as exc:
        if _precondition_failed(exc) or _not_found(exc):
            return False
        raise


def _local_tag(path: Path) -> str:
    # Every write replaces the file (a new inode), so inode + mtime names one version even on coarse clocks.
    st = path.stat()
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _precondition_failed(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in {"PreconditionFailed", "412", "ConditionalRequestConflict"} or status in (409, 412)
    return False


def iter_chunks(url: str | URL, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with open_read(url) as f:
        while chunk := f.read(chunk_size):
            yield chunk


PYARROW_CONNECT_TIMEOUT_S = 10.0
PYARROW_REQUEST_TIMEOUT_S = 60.0


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path without scheme) for Ray's own readers and Ray Train's storage_path: S3
    honouring AWS_ENDPOINT_URL (the local stack), or the local filesystem."""
    import pyarrow.fs as pafs

    u = parse_url(url)
    if u.scheme == "file":
        return pafs.LocalFileSystem(), u.key
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # The AWS SDK's defaults (1 s to connect, a transfer aborted after 3 s without progress) turn a server that
    # is slow under load into aborted and resent uploads, racing the originals still running on the server (the
    # likely way a checkpoint lost a file in a soak under load). Slow is not dead: wait longer, retry less often.
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                    "connect_timeout": PYARROW_CONNECT_TIMEOUT_S, "request_timeout": PYARROW_REQUEST_TIMEOUT_S}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
    return pafs.S3FileSystem(**kwargs), f"{u.bucket}/{u.key}"
