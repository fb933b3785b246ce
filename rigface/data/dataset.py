"""The dataset on storage: its layout, plan, shards, card, index, lease, and the one sample reader.

Layout under a dataset URL::

    lease.json                            who writes now (owner, host, expiry); absent when nobody does
    plan/v001.json                        version 1's plan, committed before any of its shards: every video
                                          (content hash, id, split) and the shard it goes to, and the config
                                          that shapes samples
    train/shard-v001-000000.tar           samples (see rigface.data.schema)
    train/shard-v001-000000.stats.json    commit marker, written after the tar: counts, skips, sha256
    val/shard-v001-000000.tar ...
    index/v001.jsonl                      one row per video of version 1 (content hash, split, shard, counts)
    dataset.json                          the card: versions, sources, config, totals, content hash

The discipline (as in video2dataset): the shard is the unit of work; a shard counts only once its stats
file exists, and the stats file is written after the tar. A run first commits its plan, so a rerun resumes
exactly that plan (a changed listing or config is refused, never silently re-planned), and ``--append``
plans only videos no earlier version holds, as the next version. Only the holder of the lease writes.

Everything that reads samples goes through ``Dataset.read_shard`` (train, evaluate, validate, preview and
the notebooks): member names are checked and sizes are bounded (rigface.data.shards.TarLimits for tar
members, rigface.data.schema.DecodeLimits for pixels and arrays), and a hostile sample is a recorded skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from rigface.data import storage
from rigface.data.schema import (
    MEMBERS, SCHEMA_VERSION, SPLITS, DecodeLimits, PairSample, SchemaError, decode_sample, pack_sample,
    safe_video_id, validate_sample,
)
from rigface.data.shards import SKIP, ShardError, TarLimits, finish_tar, iter_tar

log = logging.getLogger(__name__)

CARD_NAME = "dataset.json"
LEASE_NAME = "lease.json"
STATS_SUFFIX = ".stats.json"
_SHARD_RE = re.compile(r"^(train|val)/shard-v(\d{3,})-(\d{6,})\.(tar|stats\.json)$")
_OWNED_RE = re.compile(r"^(dataset\.json|lease\.json|index/v\d{3,}\.jsonl|plan/v\d{3,}\.json|"
                       r"(train|val)/shard-v\d{3,}-\d{6,}\.(tar|stats\.json|latents-[^/]+\.(safetensors|done\.json)))$")

# prepare settings that do not change a single sample (how fast, not what): a rerun may change them freely.
PLAN_FREE_SETTINGS = ("source", "output", "lease_seconds", "max_retries", "max_actor_restarts", "video_timeout_s",
                      "stall_timeout_s")


class DatasetError(RuntimeError):
    """The dataset cannot be used as asked: a refused overwrite, a plan that changed, a held lease."""


class LeaseHeldError(DatasetError):
    """Another run holds the dataset's lease."""


@dataclass(frozen=True)
class ReadLimits:
    """Size limits of every read (config section ``reader``)."""

    max_member_bytes: int = 64 << 20
    max_sample_bytes: int = 256 << 20
    max_image_pixels: int = 4096 * 4096
    max_npy_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, reader_cfg: Any | None) -> "ReadLimits":
        if reader_cfg is None:
            return cls()
        return cls(**{k: getattr(reader_cfg, k) for k in cls.__dataclass_fields__})

    @property
    def tar(self) -> TarLimits:
        return TarLimits(self.max_member_bytes, self.max_sample_bytes)

    @property
    def decode(self) -> DecodeLimits:
        return DecodeLimits(self.max_image_pixels, self.max_npy_bytes)


@dataclass(frozen=True)
class Shard:
    url: str
    split: str | None          # from the path; None for a hand-made shard outside train/ and val/
    samples: int | None        # from the stats file; None for a hand-made shard without one
    stats: Mapping[str, Any] | None = None


def stats_url(shard_url: str) -> str:
    if not shard_url.endswith(".tar"):
        raise ValueError(f"not a shard URL (.tar): {shard_url}")
    return shard_url[: -len(".tar")] + STATS_SUFFIX


def split_of(url: str) -> str | None:
    """'train' / 'val' when the shard's path names its split (a folder or a name prefix), else None."""
    for part in reversed(url.replace("\\", "/").split("/")):
        for split in SPLITS:
            if part == split or part.startswith((f"{split}-", f"{split}_", f"{split}.")):
                return split
    return None


def content_hash_of(shard_entries: Iterable[Mapping[str, Any]]) -> str:
    """A hash over (shard path, shard sha256) of every shard: names the exact bytes a training run reads."""
    h = hashlib.sha256()
    for name, sha in sorted((s["path"], s["sha256"]) for s in shard_entries):
        h.update(f"{name}\t{sha}\n".encode())
    return h.hexdigest()


class Dataset:
    """One dataset under ``url`` (an s3:// prefix or a local folder)."""

    def __init__(self, url: str, limits: ReadLimits | None = None) -> None:
        text = str(url)
        self.url = text.rstrip("/") or text
        self.limits = limits or ReadLimits()

    def __repr__(self) -> str:
        return f"Dataset({self.url!r})"

    # ------------------------------------------------------------ layout

    def join(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def relpath(self, url: str) -> str:
        return url[len(self.url) + 1:] if url.startswith(self.url + "/") else url

    def shard_url(self, split: str, version: int, index: int) -> str:
        return self.join(f"{split}/shard-v{version:03d}-{index:06d}.tar")

    def index_url(self, version: int) -> str:
        return self.join(f"index/v{version:03d}.jsonl")

    def plan_url(self, version: int) -> str:
        return self.join(f"plan/v{version:03d}.json")

    @property
    def card_url(self) -> str:
        return self.join(CARD_NAME)

    @property
    def lease_url(self) -> str:
        return self.join(LEASE_NAME)

    # ------------------------------------------------------------ card, index, plan

    def read_card(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(self.card_url))
        except FileNotFoundError:
            return None

    def write_card(self, card: Mapping[str, Any]) -> None:
        storage.write_text(self.card_url, json.dumps(card, indent=1, sort_keys=True))

    def read_index(self, version: int) -> list[dict[str, Any]]:
        try:
            text = storage.read_text(self.index_url(version))
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def plan_versions(self) -> list[int]:
        out = []
        for url in storage.list_urls(self.join("plan"), suffix=".json"):
            m = re.search(r"/v(\d{3,})\.json$", url)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def read_plan(self, version: int) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(self.plan_url(version)))
        except FileNotFoundError:
            return None

    def commit_plan(self, plan: Mapping[str, Any]) -> None:
        """Write a version's plan once; it is never rewritten (a rerun compares against it)."""
        data = json.dumps(plan, indent=1, sort_keys=True).encode()
        if not storage.create_exclusive(self.plan_url(int(plan["version"])), data):
            if self.read_plan(int(plan["version"])) != json.loads(data):
                raise DatasetError(f"{self.plan_url(int(plan['version']))} was committed by another run")

    def planned_hashes(self, below: int | None = None) -> set[str]:
        """Content hashes of every video any plan (of versions < ``below``) holds."""
        out: set[str] = set()
        for v in self.plan_versions():
            if below is None or v < below:
                out.update(x["content_hash"] for x in (self.read_plan(v) or {}).get("videos", []))
        return out

    # ------------------------------------------------------------ shards

    def write_shard(self, url: str, samples: Sequence[tuple[str, bytes | Mapping[str, bytes]]],
                    stats: Mapping[str, Any] | None = None, lease: "Lease | None" = None) -> dict[str, Any]:
        """Write one shard, then its stats file (the commit marker). Returns the stats written. With a lease,
        the marker is written only while this run still holds it."""
        keys = [k for k, _ in samples]
        dup = [k for k, n in Counter(keys).items() if n > 1]
        if dup:
            raise SchemaError(f"duplicate sample keys in shard {url}: {dup[:3]}")
        data = finish_tar([v if isinstance(v, (bytes, bytearray)) else pack_sample(k, v) for k, v in samples])
        storage.write_bytes(url, data)
        out = {**(dict(stats) if stats else {}), "shard": url.rsplit("/", 1)[-1], "samples": len(samples),
               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "schema_version": SCHEMA_VERSION}
        if lease is not None:
            lease.check()
        storage.write_text(stats_url(url), json.dumps(out, indent=1, sort_keys=True))
        return out

    def is_committed(self, shard_url: str) -> bool:
        return storage.exists(stats_url(shard_url))

    def read_stats(self, shard_url: str) -> dict[str, Any]:
        return json.loads(storage.read_text(stats_url(shard_url)))

    def shards(self, split: str | None = None) -> list[Shard]:
        """The committed shards (sorted), each with its split and sample count from its stats file. A tar
        without a stats file is an unfinished write and left out, unless the set has no stats files at all
        (shards made by hand): then every tar counts, with an unknown sample count."""
        urls = storage.list_urls(self.url)
        tars = [u for u in urls if u.endswith(".tar")]
        markers = {u for u in urls if u.endswith(STATS_SUFFIX)}
        out: list[Shard] = []
        if markers:
            done = [t for t in tars if stats_url(t) in markers]
            if len(done) < len(tars):
                log.warning("dataset: %d shard(s) without a stats file left out (unfinished)", len(tars) - len(done))
            for t in done:
                st = self.read_stats(t)
                out.append(Shard(t, st.get("split") or split_of(t), int(st["samples"]), st))
        else:
            out = [Shard(t, split_of(t), None) for t in tars]
        if split is not None:
            named = [s for s in out if s.split is not None]
            out = [s for s in out if s.split == split] if named else out
        return sorted(out, key=lambda s: s.url)

    def shard_urls(self, split: str | None = None) -> list[str]:
        return [s.url for s in self.shards(split)]

    # ------------------------------------------------------------ the one reader

    def read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Raw samples (``__key__`` + member bytes) of one shard, streamed. A sample over the size limits
        carries ``__skip__`` (its reason) and no bytes; a shard that cannot be read raises ShardError."""
        return read_shard(url, self.limits)

    def decode(self, raw: Mapping[str, Any]) -> PairSample:
        """A raw sample -> PairSample, within the decode limits (SchemaError otherwise)."""
        if raw.get(SKIP):
            raise SchemaError(f"{raw.get('__key__')}: {raw[SKIP]}")
        return decode_sample(raw, self.limits.decode)

    def samples(self, split: str | None = None) -> Iterator[PairSample]:
        """Every decodable sample of the committed shards (of one split), in shard order; skips logged."""
        yield from iter_samples(self.shard_urls(split), self.limits)

    # ------------------------------------------------------------ overwrite

    def refuse_root(self) -> None:
        u = storage.parse_url(self.url)
        if (u.scheme == "s3" and not u.key.strip("/")) or (u.scheme == "file" and os.path.abspath(u.key) == "/"):
            raise DatasetError(f"refusing to overwrite {self.url}: a bucket or filesystem root is never a dataset")

    def delete(self) -> int:
        """Delete this dataset, and only it: refuses a bucket root, a folder that holds no dataset, and a
        folder that holds anything a dataset does not; raises naming every object that could not go."""
        self.refuse_root()
        urls = storage.list_urls(self.url)
        names = [self.relpath(x) for x in urls]
        foreign = [n for n in names if not _OWNED_RE.match(n)]
        if foreign:
            raise DatasetError(f"refusing to overwrite {self.url}: it holds {len(foreign)} object(s) that are not "
                               f"part of a dataset, e.g. {foreign[:5]}; choose an output folder of its own")
        if names and not any(n in (CARD_NAME, LEASE_NAME) or n.startswith(("plan/", "index/"))
                             or n.endswith(STATS_SUFFIX) for n in names):
            raise DatasetError(f"refusing to overwrite {self.url}: it holds tars but no card, plan or stats file")
        # The lease goes last: until the rest is gone, a second run still sees the dataset as taken.
        urls = sorted(urls, key=lambda x: x == self.lease_url)
        failed = storage.delete_many([x for x in urls if x != self.lease_url])
        if failed:
            raise DatasetError(f"--overwrite: {len(failed)} object(s) could not be deleted: "
                               + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
        return len(urls) - (self.lease_url in urls)

    # ------------------------------------------------------------ one writer at a time

    def lease(self, owner: str, ttl_s: float = 120.0) -> "Lease":
        return Lease(self.lease_url, owner, ttl_s)


# ---------------------------------------------------------------- reading (module level: also one .tar URL)


def read_shard(url: str, limits: ReadLimits | None = None) -> Iterator[dict[str, Any]]:
    limits = limits or ReadLimits()
    try:
        stream = storage.open_read(url)
    except FileNotFoundError:
        raise ShardError(f"shard not found: {url}") from None
    with stream:
        for raw in iter_tar(stream, url, limits.tar):
            raw["__url__"] = url  # as webdataset names a sample's shard (the latent sidecars are found by it)
            yield raw


def iter_samples(urls: str | Sequence[str], limits: ReadLimits | None = None, *,
                 decode: bool = True) -> Iterator[PairSample | dict[str, Any]]:
    """Decoded samples (raw ones with ``decode=False``) of one .tar, a list of shard URLs, or every committed
    shard under a dataset URL. An unreadable shard or an undecodable / oversize sample is skipped with a warning."""
    limits = limits or ReadLimits()
    if isinstance(urls, str):
        urls = [urls] if urls.endswith(".tar") else Dataset(urls, limits).shard_urls()
    for url in urls:
        try:
            for raw in read_shard(url, limits):
                if not decode:
                    if raw.get(SKIP):
                        log.warning("dataset: skipping sample %s: %s", raw["__key__"], raw[SKIP])
                    else:
                        yield raw
                    continue
                try:
                    yield (decode_sample(raw, limits.decode) if not raw.get(SKIP)
                           else _raise(SchemaError(f"{raw['__key__']}: {raw[SKIP]}")))
                except SchemaError as exc:
                    log.warning("dataset: skipping sample: %s", exc)
        except ShardError as exc:
            log.warning("dataset: skipping shard: %s", exc)


def _raise(exc: BaseException):
    raise exc


def count_samples(url: str, limits: ReadLimits | None = None) -> int:
    """Samples of one shard, by reading it (for hand-made shards without a stats file)."""
    return sum(1 for _ in read_shard(url, limits))


# ---------------------------------------------------------------- validation


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0
    skipped: int = 0
    faults: list[str] = field(default_factory=list)
    per_split: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.faults and self.shards > 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "skipped": self.skipped,
                "per_split": self.per_split, "faults": self.faults}


def validate(url: str, limits: ReadLimits | None = None, *, max_faults: int = 1000) -> ShardReport:
    """Check every sample of every shard under ``url`` (a dataset or one .tar) against the schema, each shard
    against its stats file (present, same sample count and sha256), and keys for duplicates across shards.
    Every read is bounded by ``limits``; an oversize sample is a fault, not an allocation."""
    limits = limits or ReadLimits()
    report = ShardReport()
    shard_urls = [url] if url.endswith(".tar") else [t for t in storage.list_urls(url) if t.endswith(".tar")]
    if not shard_urls:
        report.faults.append(f"no shards under {url}")
        return report
    seen: dict[str, str] = {}

    def fault(msg: str) -> None:
        if len(report.faults) < max_faults:
            report.faults.append(msg)

    for shard in sorted(shard_urls):
        report.shards += 1
        split = shard.rstrip("/").split("/")[-2] if "/" in shard else ""
        try:
            stats = json.loads(storage.read_text(stats_url(shard)))
        except FileNotFoundError:
            stats = None
            fault(f"{shard}: no stats file (shard not committed)")
        n = 0
        try:
            if stats:
                h = hashlib.sha256()
                for chunk in storage.iter_chunks(shard):
                    h.update(chunk)
                if stats.get("sha256") != h.hexdigest():
                    fault(f"{shard}: sha256 differs from its stats file")
            for raw in read_shard(shard, limits):
                n += 1
                key = raw["__key__"]
                if key in seen:
                    fault(f"{shard}: key {key} also in {seen[key]}")
                seen[key] = shard
                if raw.get(SKIP):
                    report.skipped += 1
                    fault(f"{shard}: {raw[SKIP]}")
                    continue
                extra = sorted(set(raw) - set(MEMBERS) - {"__key__", "__url__"})
                if extra:
                    fault(f"{shard}: {key}: unexpected members {extra}")
                for msg in validate_sample(raw, limits.decode):
                    fault(f"{shard}: {msg}")
                if not _split_ok(raw, split):
                    fault(f"{shard}: {key}: meta split differs from the shard's folder {split!r}")
        except (ShardError, FileNotFoundError) as exc:
            fault(str(exc))
        if stats and stats.get("samples") != n:
            fault(f"{shard}: holds {n} samples, stats say {stats.get('samples')}")
        report.samples += n
        report.per_split[split] = report.per_split.get(split, 0) + n
    return report


def _split_ok(raw: Mapping[str, Any], split: str) -> bool:
    if split not in SPLITS:
        return True
    try:
        return json.loads(raw["meta.json"]).get("split") == split
    except Exception:  # noqa: BLE001 - a broken meta.json is reported by validate_sample
        return True


# ---------------------------------------------------------------- planning (what prepare writes)


def sample_config(prepare_cfg: Mapping[str, Any], face_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that shape samples: a rerun that resumes a plan must use exactly these."""
    return {"prepare": {k: v for k, v in sorted(prepare_cfg.items()) if k not in PLAN_FREE_SETTINGS},
            "face": dict(sorted(face_cfg.items()))}


def plan_shards(ds: Dataset, videos: Iterable[dict[str, Any]], *, version: int, videos_per_shard: int,
                val_fraction: float, seed: int, known: set[str],
                full_hash: Callable[[str], str] | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
    """Deterministic assignment of videos to shards: per split, by sorted content hash, fixed-size groups.
    Returns (shard URL -> its videos, duplicates): a video whose content an earlier version or an earlier
    listing row holds is a duplicate, planned nowhere.

    Identities are sampled hashes; two videos of this listing that share one are compared by `full_hash`
    (sources.full_content_hash) before one is dropped as a duplicate, and a different one keeps its full hash
    as its identity. Identities from earlier versions (`known`) are trusted as they are.
    """
    from rigface.data.sources import VideoRef, assign_split, derive_video_id

    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen = set(known)
    first_url: dict[str, str] = {}
    ids: set[str] = set()
    dups = []
    for v in sorted(videos, key=lambda r: (r["content_hash"], r["url"])):
        h = v["content_hash"]
        if h in first_url and full_hash is not None and full_hash(first_url[h]) != full_hash(v["url"]):
            v["content_hash"] = h = full_hash(v["url"])  # same samples, other bytes: a different video
        if h in seen:
            dups.append(v)
            continue
        seen.add(h)
        first_url[h] = v["url"]
        vid = derive_video_id(VideoRef(url=v["url"], name=v["name"], source=v["source"],
                                       video_id=v.get("video_id") or None), v["content_hash"])
        if vid in ids:  # two manifest rows naming one id: the content hash keeps their samples apart
            vid = safe_video_id(vid, v["content_hash"])
        ids.add(vid)
        v["video_id"] = vid
        v["split"] = v.get("split") or assign_split(v["content_hash"], val_fraction, seed)
        by_split[v["split"]].append(v)
    out: dict[str, list[dict[str, Any]]] = {}
    for split in sorted(by_split):
        group = by_split[split]
        for i in range(0, len(group), videos_per_shard):
            url = ds.shard_url(split, version, i // videos_per_shard)
            members = group[i: i + videos_per_shard]
            for m in members:
                m["shard"] = url
            out[url] = members
    return out, dups


def plan_record(ds: Dataset, version: int, sources: list[str], shard_plan: Mapping[str, list[dict]],
                dups: list[dict], unreadable: list[dict], config: Mapping[str, Any]) -> dict[str, Any]:
    """The committed form of a plan: what a rerun must reproduce exactly to resume it."""
    videos = [{"content_hash": v["content_hash"], "video_id": v["video_id"], "split": v["split"],
               "name": v["name"], "source": v["source"], "url": v["url"], "shard": ds.relpath(url)}
              for url, vids in sorted(shard_plan.items()) for v in vids]
    return {"version": version, "sources": sorted(sources), "config": dict(config), "videos": videos,
            "duplicates": sorted(v["content_hash"] for v in dups),
            "unreadable": sorted(v["url"] for v in unreadable)}


def plan_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why a rerun's plan is not the committed one, in words; empty when they agree."""
    out = []
    if old.get("sources") != new.get("sources"):
        out.append(f"sources were {old.get('sources')}, now {new.get('sources')}")
    if old.get("config") != new.get("config"):
        flat_old, flat_new = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
        changed = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
        out.append(f"settings that shape samples changed: {changed[:8]}")
    before = {v["content_hash"]: v for v in old.get("videos", [])}
    after = {v["content_hash"]: v for v in new.get("videos", [])}
    added = [after[h]["name"] for h in sorted(set(after) - set(before))]
    gone = [before[h]["name"] for h in sorted(set(before) - set(after))]
    if added:
        out.append(f"{len(added)} video(s) not in the plan: {added[:5]}")
    if gone:
        out.append(f"{len(gone)} planned video(s) no longer listed: {gone[:5]}")
    if not out and old.get("videos") != new.get("videos"):
        out.append("the same videos would go to different shards")
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finish_version(ds: Dataset, *, version: int, sources: list[str], shard_urls: Iterable[str],
                   src_of: Mapping[str, str], unreadable: list[dict], dups: list[dict],
                   config: Mapping[str, Any], code_version: str) -> dict[str, Any]:
    """After every planned shard is committed: write the version's index and the card. Returns the card."""
    stats = {url: ds.read_stats(url) for url in shard_urls}
    index_rows = []
    video_skips: Counter[str] = Counter()
    frame_skips: Counter[str] = Counter()
    per_source: dict[str, Counter] = defaultdict(Counter)
    per_split: dict[str, int] = {}
    pairs = videos_ok = frames = 0
    for url, st in stats.items():
        split = st.get("split", "")
        per_split[split] = per_split.get(split, 0) + st["samples"]
        if st["shard"] != url.rsplit("/", 1)[-1]:
            raise DatasetError(f"stats file of {url} names another shard")
        for r in st["video_reports"]:
            index_rows.append({**r, "split": split, "shard": url.rsplit("/", 1)[-1]})
            src = src_of.get(r["content_hash"], "")
            per_source[src]["videos"] += 1
            per_source[src]["pairs"] += r["pairs"]
            per_source[src]["videos_ok"] += int(not r["status"])
        video_skips.update(st["video_skips"])
        frame_skips.update(st["frame_skips"])
        pairs += st["pairs"]
        videos_ok += st["videos_ok"]
        frames += st["frames_analyzed"]
    for r in unreadable:
        reason = r.get("status") or "unreadable"  # unreadable, not_a_file, too_large
        video_skips[reason] += 1
        per_source[r["source"]][f"videos_{reason}"] += 1
    for r in dups:
        per_source[r["source"]]["videos_duplicate"] += 1
    storage.write_text(ds.index_url(version), "".join(json.dumps(r, sort_keys=True) + "\n" for r in index_rows))
    card = ds.read_card()
    prev_versions = [v for v in (card or {}).get("versions", []) if int(v["version"]) < version]
    shard_entries = [{"path": ds.relpath(url), "sha256": st["sha256"], "samples": st["samples"],
                      "split": st.get("split", "")} for url, st in sorted(stats.items())]
    all_shards = [s for v in prev_versions for s in v["shards"]] + shard_entries
    content_hash = content_hash_of(all_shards)
    entry = {
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version,
        "config": dict(config),
        "sources": [{"source": s, **dict(per_source.get(s, {}))} for s in sources],
        "totals": {"videos": sum(st["videos"] for st in stats.values()), "videos_ok": videos_ok,
                   "pairs": pairs, "shards": len(stats), "per_split": per_split, "frames_analyzed": frames,
                   "video_skips": dict(sorted(video_skips.items())), "frame_skips": dict(sorted(frame_skips.items())),
                   "videos_duplicate": len(dups)},
        "shards": shard_entries,
        "index": ds.relpath(ds.index_url(version)),
        "content_hash": content_hash,  # over every shard of versions 1..this one
    }
    totals: Counter = Counter()
    for v in prev_versions + [entry]:
        totals.update({k: v["totals"][k] for k in ("videos", "videos_ok", "pairs", "shards")})
    new_card = {"name": ds.url.rsplit("/", 1)[-1], "schema_version": SCHEMA_VERSION, "latest": version,
                "content_hash": content_hash, "totals": dict(totals), "versions": prev_versions + [entry]}
    ds.write_card(new_card)
    return new_card


# ---------------------------------------------------------------- the lease


class Lease:
    """One writer at a time: ``lease.json`` created only if absent (S3 ``If-None-Match: *``, which the local
    SeaweedFS honours; O_EXCL locally), renewed by a background thread with ``If-Match`` on its own version,
    released by a conditional delete. A lease past its expiry (a killed run) is taken over, again with
    ``If-Match``, so two runs racing for a stale lease cannot both win."""

    def __init__(self, url: str, owner: str, ttl_s: float = 120.0) -> None:
        self.url = url
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": os.getpid(), "token": self.token,
                           "renewed": now, "expires": now + self.ttl_s,
                           "expires_utc": datetime.fromtimestamp(now + self.ttl_s, timezone.utc).isoformat(
                               timespec="seconds")}).encode()

    def acquire(self) -> "Lease":
        if not storage.create_exclusive(self.url, self._body()):
            data, etag = storage.read_with_etag(self.url)
            holder = _parse(data)
            if holder.get("token") != self.token:  # (the same token: our own create whose reply was lost)
                if float(holder.get("expires", 0)) > time.time():
                    raise LeaseHeldError(
                        f"{self.url} is held by {holder.get('owner')!r} on {holder.get('host')} "
                        f"(pid {holder.get('pid')}) until {holder.get('expires_utc')}: another run writes this "
                        "dataset; wait for it, or, if it was killed, for the lease to expire")
                if not storage.replace_if(self.url, self._body(), etag):
                    raise LeaseHeldError(f"{self.url}: another run took over the expired lease first")
                log.warning("dataset: took over an expired lease of %r on %s", holder.get("owner"), holder.get("host"))
        self._refresh_etag()
        self._thread = threading.Thread(target=self._renew_loop, name="dataset-lease", daemon=True)
        self._thread.start()
        return self

    def _refresh_etag(self) -> None:
        data, etag = storage.read_with_etag(self.url)
        if _parse(data).get("token") != self.token:
            raise LeaseHeldError(f"{self.url}: lost the lease to {_parse(data).get('owner')!r}")
        self._etag = etag

    def renew(self) -> None:
        if self._etag is None or not storage.replace_if(self.url, self._body(), self._etag):
            self._lost = f"{self.url}: the lease was taken by another run"
            return
        self._refresh_etag()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - reported by check(); the writer stops at its next commit
                self._lost = f"{self.url}: cannot renew the lease: {exc}"
            if self._lost:
                log.error("dataset: %s", self._lost)
                return

    def check(self) -> None:
        """Raise if this run no longer holds the lease (called before every commit)."""
        if self._lost:
            raise LeaseHeldError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._etag is not None and not self._lost:
            try:
                storage.delete_if(self.url, self._etag)
            except Exception as exc:  # noqa: BLE001 - an unreleased lease expires on its own
                log.warning("dataset: could not release %s: %s", self.url, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        out = json.loads(data)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}
