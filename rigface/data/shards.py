"""The shard file: a plain tar of samples (see rigface.data.schema), written deterministically and read back
as a stream with limits. The dataset around the shards (names, stats files, card, listing) is
rigface.data.dataset's; this module only knows the bytes of one tar.

Reading never trusts the tar: member names are checked (no absolute paths, no '..', a valid sample key) and
never used as paths, only regular files are accepted, and a member's declared size is checked before its
bytes are read, so a 10 KB tar declaring a 1 GiB (sparse) member costs nothing. An oversize member marks its
sample skipped (``__skip__``); a tar that cannot be parsed is a ShardError.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

from rigface.data.schema import SchemaError, split_member_name

_END_OF_ARCHIVE = b"\0" * 1024
_RECORD = 10240
SKIP = "__skip__"  # set on a raw sample that must not be decoded, with the reason


class ShardError(RuntimeError):
    """A shard that cannot be read (missing, not a tar, unsafe or non-file members)."""


@dataclass(frozen=True)
class TarLimits:
    max_member_bytes: int = 64 << 20
    max_sample_bytes: int = 256 << 20


def finish_tar(fragments: Iterable[bytes]) -> bytes:
    """Concatenate per-sample tar records (schema.pack_sample) and close the archive, padded like tarfile."""
    body = b"".join(fragments) + _END_OF_ARCHIVE
    pad = (-len(body)) % _RECORD
    return body + b"\0" * pad


def iter_tar(stream: IO[bytes], name: str, limits: TarLimits | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__`` + member bytes) of one tar stream, in order. A sample with a member over the
    limits (or a sparse member, which no writer of ours makes) comes back with only ``__key__`` and ``__skip__``."""
    limits = limits or TarLimits()
    current: dict[str, Any] | None = None
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    raise ShardError(f"{name}: member {info.name!r} is not a regular file")
                try:
                    key, ext = split_member_name(info.name)
                except SchemaError as exc:
                    raise ShardError(f"{name}: {exc}") from None
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current, total = {"__key__": key}, 0
                if ext in current:
                    raise ShardError(f"{name}: member {info.name!r} appears twice")
                total += info.size
                if SKIP in current:
                    current[ext] = None
                    continue
                if info.issparse():
                    reason = f"{info.name}: sparse member of {info.size} bytes"
                elif info.size > limits.max_member_bytes:
                    reason = f"{info.name}: {info.size} bytes, over the member limit of {limits.max_member_bytes}"
                elif total > limits.max_sample_bytes:
                    reason = f"{key}: over the sample limit of {limits.max_sample_bytes} bytes"
                else:
                    f = tar.extractfile(info)
                    current[ext] = f.read() if f is not None else b""
                    continue
                current = {"__key__": key, SKIP: reason, **{k: None for k in current if not k.startswith("__")},
                           ext: None}
    except tarfile.TarError as exc:
        raise ShardError(f"{name}: not a readable tar: {exc}") from None
    if current is not None:
        yield current
