"""WebDataset shards on S3 or a local folder: write (atomic, with a commit marker), read, validate, and the
dataset card.

Layout under a dataset URL::

    dataset.json                          the card: versions, sources, config, totals, content hash
    index/v001.jsonl                      one row per video of version 1 (content hash, split, shard, counts)
    train/shard-v001-000000.tar           samples (see rigface.data.schema)
    train/shard-v001-000000.stats.json    commit marker, written after the tar: counts and skips
    val/shard-v001-000000.tar ...

A shard whose stats file exists is complete; a rerun skips it. Tar bytes are deterministic (fixed member
order, mtime and owner), so a resumed run and an uninterrupted run give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from rigface.data import storage
from rigface.data.schema import (
    MEMBERS, SCHEMA_VERSION, PairSample, SchemaError, decode_sample, pack_sample, parse_key,
    split_member_name, validate_sample,
)

log = logging.getLogger(__name__)

CARD_NAME = "dataset.json"
STATS_SUFFIX = ".stats.json"
_END_OF_ARCHIVE = b"\0" * 1024
_RECORD = 10240


class ShardError(RuntimeError):
    """A shard that cannot be read (missing, not a tar, unsafe member names)."""


def shard_name(split: str, version: int, index: int) -> str:
    return f"{split}/shard-v{version:03d}-{index:06d}.tar"


def stats_url(shard_url: str) -> str:
    if not shard_url.endswith(".tar"):
        raise ValueError(f"not a shard URL (.tar): {shard_url}")
    return shard_url[: -len(".tar")] + STATS_SUFFIX


def finish_tar(fragments: Iterable[bytes]) -> bytes:
    """Concatenate per-sample tar records (schema.pack_sample) and close the archive, padded like tarfile."""
    body = b"".join(fragments) + _END_OF_ARCHIVE
    pad = (-len(body)) % _RECORD
    return body + b"\0" * pad


def write_shard(url: str, samples: Sequence[tuple[str, bytes | Mapping[str, bytes]]],
                stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard atomically, then its stats file (the commit marker). Returns the stats written.

    ``samples`` are (key, packed tar bytes) or (key, member -> bytes) pairs; keys must be unique.
    """
    keys = [k for k, _ in samples]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    if dup:
        raise SchemaError(f"duplicate sample keys in shard {url}: {dup[:3]}")
    fragments = [v if isinstance(v, (bytes, bytearray)) else pack_sample(k, v) for k, v in samples]
    data = finish_tar(fragments)
    storage.write_bytes(url, data)
    out = {
        **(dict(stats) if stats else {}),
        "shard": url.rsplit("/", 1)[-1],
        "samples": len(samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "schema_version": SCHEMA_VERSION,
    }
    # Written last: its presence means the tar above is complete.
    storage.write_text(stats_url(url), json.dumps(out, indent=1, sort_keys=True))
    return out


def is_done(shard_url: str) -> bool:
    return storage.exists(stats_url(shard_url))


def read_stats(shard_url: str) -> dict[str, Any]:
    return json.loads(storage.read_text(stats_url(shard_url)))


def _iter_tar(tar: tarfile.TarFile, name: str) -> Iterator[dict[str, Any]]:
    # Member names are checked (no absolute paths, no '..', a valid sample key) and never used as paths.
    current: dict[str, Any] | None = None
    for info in tar:
        if not info.isfile():
            raise ShardError(f"{name}: member {info.name!r} is not a regular file")
        try:
            key, ext = split_member_name(info.name)
        except SchemaError as exc:
            raise ShardError(f"{name}: {exc}") from None
        f = tar.extractfile(info)
        payload = f.read() if f is not None else b""
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            raise ShardError(f"{name}: member {info.name!r} appears twice")
        current[ext] = payload
    if current is not None:
        yield current


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__`` + member bytes) of one shard, streamed with the standard tarfile module."""
    try:
        stream = storage.open_read(url)
    except FileNotFoundError:
        raise ShardError(f"shard not found: {url}") from None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            yield from _iter_tar(tar, url)
    except tarfile.TarError as exc:
        raise ShardError(f"{url}: not a readable tar: {exc}") from None


def read_shard_bytes(data: bytes, name: str = "<shard>") -> Iterator[dict[str, Any]]:
    """Like read_shard, from bytes already in memory."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            yield from _iter_tar(tar, name)
    except tarfile.TarError as exc:
        raise ShardError(f"{name}: not a readable tar: {exc}") from None


def list_shards(dataset_url: str, split: str | None = None) -> list[str]:
    prefix = storage.join(dataset_url, split) if split else dataset_url
    return storage.list_urls(prefix, suffix=".tar")


# ---------------------------------------------------------------- plain webdataset / Ray readers

_wds_lock = threading.Lock()


def register_webdataset_s3() -> None:
    """Teach webdataset's gopen to open ``s3://`` URLs through our storage module (boto3, retries)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is also a function
    with _wds_lock:
        if "s3" not in gopen.gopen_schemes:
            def gopen_s3(url, mode="rb", bufsize=8192, **kw):
                if mode != "rb":
                    raise ValueError(f"{url}: s3 handler is read-only")
                return storage.open_read(url)

            gopen.gopen_schemes["s3"] = gopen_s3


def iter_samples(urls: str | Sequence[str], *, decode: bool = True) -> Iterator[PairSample | dict[str, Any]]:
    """Samples of one or more shards (or every shard under a dataset URL) read with plain ``webdataset``."""
    import webdataset as wds

    register_webdataset_s3()
    if isinstance(urls, str):
        urls = [urls] if urls.endswith(".tar") else list_shards(urls)
    if not urls:
        return
    ds = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False)
    for raw in ds:
        raw = {k: v for k, v in raw.items()}
        yield decode_sample(raw) if decode else raw


def pyarrow_filesystem(url: str):
    """A pyarrow filesystem for ``ray.data.read_webdataset(paths, filesystem=...)``: S3 honouring
    AWS_ENDPOINT_URL (the local stack) or the local filesystem. Returns (filesystem, paths-without-scheme)."""
    import os

    import pyarrow.fs as pafs

    u = storage.parse_url(url)
    if u.scheme == "file":
        return pafs.LocalFileSystem(), u.key
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
    return pafs.S3FileSystem(**kwargs), f"{u.bucket}/{u.key}"


# ---------------------------------------------------------------- validation


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0
    faults: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.faults and self.shards > 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples,
                "per_split": self.per_split, "faults": self.faults}


def validate_shards(url: str, *, max_faults: int = 1000) -> ShardReport:
    """Check every sample of every shard under ``url`` (a dataset or one .tar) against the schema, each shard
    against its stats file (present, same sample count and sha256), and keys for duplicates across shards."""
    report = ShardReport()
    shard_urls = [url] if url.endswith(".tar") else list_shards(url)
    if not shard_urls:
        report.faults.append(f"no shards under {url}")
        return report
    seen: dict[str, str] = {}

    def fault(msg: str) -> None:
        if len(report.faults) < max_faults:
            report.faults.append(msg)

    for shard in shard_urls:
        report.shards += 1
        split = shard.rstrip("/").split("/")[-2] if "/" in shard else ""
        try:
            stats = read_stats(shard)
        except FileNotFoundError:
            stats = None
            fault(f"{shard}: no stats file (shard not committed)")
        n = 0
        try:
            data = storage.read_bytes(shard)
            if stats and stats.get("sha256") != hashlib.sha256(data).hexdigest():
                fault(f"{shard}: sha256 differs from its stats file")
            for raw in read_shard_bytes(data, shard):
                n += 1
                key = raw["__key__"]
                if key in seen:
                    fault(f"{shard}: key {key} also in {seen[key]}")
                seen[key] = shard
                extra = sorted(set(raw) - set(MEMBERS) - {"__key__", "__url__"})
                if extra:
                    fault(f"{shard}: {key}: unexpected members {extra}")
                for msg in validate_sample(raw):
                    fault(f"{shard}: {msg}")
                if not msg_split_ok(raw, split):
                    fault(f"{shard}: {key}: meta split differs from the shard's folder {split!r}")
        except (ShardError, FileNotFoundError) as exc:
            fault(str(exc))
        if stats and stats.get("samples") != n:
            fault(f"{shard}: holds {n} samples, stats say {stats.get('samples')}")
        report.samples += n
        report.per_split[split] = report.per_split.get(split, 0) + n
    return report


def msg_split_ok(raw: Mapping[str, Any], split: str) -> bool:
    if split not in ("train", "val"):
        return True
    try:
        return json.loads(raw["meta.json"]).get("split") == split
    except Exception:  # noqa: BLE001 - a broken meta.json is reported by validate_sample
        return True


# ---------------------------------------------------------------- dataset card


def read_card(dataset_url: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(storage.join(dataset_url, CARD_NAME)))
    except FileNotFoundError:
        return None


def write_card(dataset_url: str, card: Mapping[str, Any]) -> None:
    storage.write_text(storage.join(dataset_url, CARD_NAME), json.dumps(card, indent=1, sort_keys=True))


def index_url(dataset_url: str, version: int) -> str:
    return storage.join(dataset_url, f"index/v{version:03d}.jsonl")


def read_index(dataset_url: str, version: int) -> list[dict[str, Any]]:
    try:
        text = storage.read_text(index_url(dataset_url, version))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def known_hashes(dataset_url: str, card: Mapping[str, Any] | None) -> set[str]:
    """Content hashes of every video any version of the dataset already holds."""
    if not card:
        return set()
    out: set[str] = set()
    for v in card.get("versions", []):
        out.update(row["content_hash"] for row in read_index(dataset_url, int(v["version"])))
    return out


def dataset_content_hash(shard_stats: Iterable[Mapping[str, Any]]) -> str:
    """A hash over (shard name, shard sha256) of every shard: names the exact bytes a training run reads."""
    h = hashlib.sha256()
    for name, sha in sorted((s["path"], s["sha256"]) for s in shard_stats):
        h.update(f"{name}\t{sha}\n".encode())
    return h.hexdigest()


def shard_urls_of_version(dataset_url: str, version: int, split: str | None = None) -> list[str]:
    """Shards that make up a dataset version (every shard of versions 1..version)."""
    out = []
    for url in list_shards(dataset_url, split):
        name = url.rsplit("/", 1)[-1]
        try:
            v = int(name.split("-")[1].lstrip("v"))
        except (IndexError, ValueError):
            continue
        if v <= version:
            out.append(url)
    return out


__all__ = [
    "CARD_NAME", "ShardError", "ShardReport", "dataset_content_hash", "finish_tar", "index_url", "is_done",
    "iter_samples", "known_hashes", "list_shards", "pyarrow_filesystem", "read_card", "read_index",
    "read_shard", "read_shard_bytes", "read_stats", "register_webdataset_s3", "shard_name",
    "shard_urls_of_version", "stats_url", "validate_shards", "write_card", "write_shard", "parse_key",
]
