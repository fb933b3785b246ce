"""Video sources: a local folder, an s3:// prefix, or a manifest (CSV / JSONL / Parquet).

A manifest has a ``path`` column (absolute, s3://, or relative to the manifest's folder) and optional
``video_id`` and ``split`` columns. Every listed video gets a content hash (sha256 of its bytes), which names
it for de-duplication across sources (``--append`` skips a video whose hash the dataset already holds).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from rigface.data import storage
from rigface.data.schema import SPLITS, safe_video_id
from rigface.data.video import VIDEO_EXTENSIONS

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".parquet")


class SourceError(ValueError):
    """A source that cannot be listed: missing, empty of videos, or a malformed manifest."""


@dataclass(frozen=True)
class VideoRef:
    url: str                 # local path or s3:// URL
    name: str                # path relative to the source root (or the manifest's video_id), for humans
    source: str              # the source it was listed from
    video_id: str | None = None   # from a manifest; otherwise derived from name + content hash
    split: str | None = None      # from a manifest; otherwise assigned by hash

    def to_dict(self) -> dict:
        return asdict(self)


def is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def list_videos(source: str) -> list[VideoRef]:
    """Every video of a source, sorted by URL (the order is part of reproducibility)."""
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        return _read_manifest(source)
    u = storage.parse_url(source)
    if u.scheme == "file" and not Path(u.key).exists():
        raise SourceError(f"source not found: {source}")
    urls = storage.list_urls(source)
    root = str(u).rstrip("/") + "/"
    refs = []
    for url in urls:
        if not is_video(url):
            continue
        name = url[len(root):] if url.startswith(root) else PurePosixPath(url).name
        refs.append(VideoRef(url=url, name=name, source=source))
    if not refs:
        raise SourceError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {source}")
    return sorted(refs, key=lambda r: r.url)


def _read_manifest(source: str) -> list[VideoRef]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(source)
    except FileNotFoundError:
        raise SourceError(f"manifest not found: {source}") from None
    buf = pa.BufferReader(data)
    try:
        lower = source.lower()
        if lower.endswith(".csv"):
            table = pacsv.read_csv(buf)
        elif lower.endswith(".jsonl"):
            table = pajson.read_json(buf)
        else:
            table = pq.read_table(buf)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"manifest {source} cannot be parsed: {exc}") from None
    if "path" not in table.column_names:
        raise SourceError(f"manifest {source} has no 'path' column (columns: {table.column_names})")
    rows = table.to_pylist()
    base = storage.parse_url(source)
    refs = []
    for i, row in enumerate(rows):
        path = row.get("path")
        if not isinstance(path, str) or not path:
            raise SourceError(f"manifest {source} row {i}: empty path")
        url = _resolve(base, path)
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise SourceError(f"manifest {source} row {i}: split {split!r} not in {SPLITS}")
        vid = row.get("video_id")
        refs.append(VideoRef(
            url=url, name=str(vid) if vid else path, source=source,
            video_id=safe_video_id(str(vid)) if vid else None, split=split,
        ))
    if not refs:
        raise SourceError(f"manifest {source} lists no videos")
    return sorted(refs, key=lambda r: r.url)


def _resolve(base: storage.URL, path: str) -> str:
    if path.startswith("s3://") or os.path.isabs(path):
        return path
    if base.scheme == "s3":
        parent = base.key.rsplit("/", 1)[0] if "/" in base.key else ""
        return f"s3://{base.bucket}/{parent + '/' if parent else ''}{path}"
    return str(Path(base.key).parent / path)


def check_source(url: str, max_bytes: int) -> tuple[str, int]:
    """(why the source cannot be read as a video file, '' when it can; its size). Checked before any byte is
    read, so a
    device (/dev/zero never ends), a FIFO (blocks for ever), a directory or an oversized object is a recorded
    skip instead of a hung or exhausted worker."""
    u = storage.parse_url(url)
    if u.scheme == "file":
        try:
            st = os.stat(u.key)  # follows symlinks: a link to a device is a device
        except OSError:
            return "unreadable", 0
        if not stat.S_ISREG(st.st_mode):
            return "not_a_file", 0
        size = st.st_size
    else:
        try:
            size = storage.size(url)
        except Exception:  # noqa: BLE001 - a vanished object is an unreadable source, not a crash
            return "unreadable", 0
    return ("too_large" if size > max_bytes else ""), size


# Video identity reads this many evenly spaced windows (first and last bytes included), not the whole file.
HASH_SAMPLES = 8
HASH_WINDOW = 1 << 16  # 64 KiB


def content_hash(url: str, size: int | None = None) -> str:
    """The video's identity: sha256 over its size and HASH_SAMPLES evenly spaced 64 KiB windows.

    A few small reads (ranged GETs on S3) instead of the whole file, so listing 10^5 videos costs seconds per
    thousand, not a second read of the dataset. A file of up to HASH_SAMPLES windows is read whole. Two
    different videos of the same size that agree on every window would share an identity: where that
    matters (a duplicate about to be dropped) `full_content_hash` decides. Store-independent on purpose (an
    S3 ETag is an MD5 only for single-part uploads and differs from a local file's identity).
    """
    n = storage.size(url) if size is None else int(size)
    h = hashlib.sha256(f"rigface-sampled-v1:{n}:".encode())
    if n <= HASH_SAMPLES * HASH_WINDOW:
        h.update(storage.read_range(url, 0, n) if n else b"")
    else:
        for i in range(HASH_SAMPLES):
            h.update(storage.read_range(url, round(i * (n - HASH_WINDOW) / (HASH_SAMPLES - 1)), HASH_WINDOW))
    return h.hexdigest()


def full_content_hash(url: str) -> str:
    """sha256 of the video's bytes, streamed (never the whole file in memory)."""
    h = hashlib.sha256()
    for chunk in storage.iter_chunks(url, 1 << 22):
        h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def local_copy(url: str, tmp_dir: str | None = None) -> Iterator[str]:
    """A local path to read the video from: the file itself, or a temp download of an s3:// object."""
    u = storage.parse_url(url)
    if u.scheme == "file":
        yield u.key
        return
    suffix = PurePosixPath(u.key).suffix
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=tmp_dir, prefix="rigface-video-")
    os.close(fd)
    try:
        storage.download_file(url, tmp)
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def derive_video_id(ref: VideoRef, digest: str) -> str:
    return ref.video_id or safe_video_id(PurePosixPath(ref.name).with_suffix("").as_posix(), digest)


def assign_split(digest: str, val_fraction: float, seed: int = 0) -> str:
    """Split by video (never by frame): a stable function of the content hash."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(f"split:{seed}:{digest}".encode()).digest()[:8], "little")
    return "val" if h / 2**64 < val_fraction else "train"
