"""Training data for `rigface train`: each Ray Train worker streams its own part of the WebDataset shards.

Why webdataset + a torch DataLoader rather than Ray Data: the shard is already the unit of work, so a worker
only needs its list of shard URLs; the DataLoader's background processes stream tars from S3, decode and
batch them, with no extra Ray Data executor competing for CPUs beside the trainer (see bench/train.py).

Each shard comes with its sample count (from its stats file); empty shards are left out, and the driver
checks that there are at least ranks x batch samples before training starts. Per epoch the shard list is
shuffled with ``seed + epoch`` (the same order on every rank), then split: by whole shards balanced by sample
count when that gives every rank a full batch, else by sample (every rank reads every shard and keeps the
samples ``i % world == rank``). Either way the ranks see disjoint data and none starves. Inside a rank the DataLoader workers split the rank's shards again (webdataset
``split_by_worker``) and shuffle samples in a seeded buffer. A shard that cannot be read, or a sample that
does not decode, is skipped with a logged warning.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from rigface.data import latents as latent_cache
from rigface.data.dataset import Dataset, ReadLimits, count_samples, read_shard
from rigface.data.schema import SchemaError, decode_sample
from rigface.data.shards import SKIP, ShardError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("source", "target", "render", "background")
LATENT_PREFIX = "latent_"  # == rigface.model.training.LATENT_PREFIX (kept torch-model-free here)
LATENT_KEYS = tuple(LATENT_PREFIX + k for k in latent_cache.LATENT_KEYS)


class TrainDataError(RuntimeError):
    """Training data that cannot work (no shards, fewer samples than ranks x batch, an epoch without a batch).
    Deterministic: retrying the same run on the same data fails the same way."""


def warn_and_skip(exc: BaseException) -> bool:
    """webdataset handler: log what was skipped (a sample that does not decode) and go on."""
    log.warning("train data: skipping a sample: %s", exc)
    return True


# ---------------------------------------------------------------- shard lists

ShardRef = tuple[str, int]  # (URL, samples): what a worker is handed


def list_shards(data_url: str, limits: ReadLimits | None = None) -> list[ShardRef]:
    """The committed shards under ``data_url`` with their sample counts (from the stats files; a hand-made
    set without stats files is counted by reading it), sorted; empty shards are left out."""
    ds = Dataset(data_url, limits)
    refs = []
    for shard in ds.shards():
        n = shard.samples if shard.samples is not None else count_samples(shard.url, ds.limits)
        if n > 0:
            refs.append((shard.url, n))
    if not refs:
        raise TrainDataError(f"no shards holding samples under {data_url}")
    return sorted(refs)


def split_name_of(url: str) -> str | None:
    """'train' / 'val' when the shard's path names its split (a folder or a name prefix), else None."""
    from rigface.data.dataset import split_of

    return split_of(url)


def shards_for_split(refs: list[ShardRef], split: str) -> list[ShardRef]:
    """Shards whose path names ``split``; all of them when paths name no split (then meta.json decides)."""
    named = [r for r in refs if split_name_of(r[0]) is not None]
    if not named:
        return list(refs)
    return [r for r in refs if split_name_of(r[0]) == split]


def check_enough(refs: list[ShardRef], *, world: int, batch_size: int) -> None:
    """Before training starts: every rank must get at least one full batch per epoch."""
    total = sum(n for _, n in refs)
    if total < world * batch_size:
        raise TrainDataError(f"{total} training sample(s) in {len(refs)} shard(s) cannot give {world} worker(s) a "
                             f"batch of {batch_size} each: add data, or lower train.num_workers or train.batch_size")


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch."""

    urls: list[str]
    sample_stride: int  # 1: whole shards; world: keep every world-th sample
    sample_offset: int


def plan_epoch(refs: list[ShardRef], *, rank: int, world: int, epoch: int, seed: int,
               batch_size: int = 1) -> RankPlan:
    """Whole shards per rank, balanced by sample count (largest first, each to the rank holding the fewest),
    when that gives every rank a full batch; otherwise every rank reads every shard and keeps every
    ``world``-th sample, which splits the samples evenly whatever the shard sizes."""
    order = sorted(refs)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if len(order) >= world:
        loads = [0] * world
        assigned: list[list[str]] = [[] for _ in range(world)]
        for url, n in sorted(order, key=lambda r: -r[1]):  # stable: ties keep the epoch's shuffled order
            r = min(range(world), key=lambda i: (loads[i], i))
            loads[r] += n
            assigned[r].append(url)
        if min(loads) >= batch_size:
            mine = set(assigned[rank])
            return RankPlan([u for u, _ in order if u in mine], 1, 0)
    return RankPlan([u for u, _ in order], world, rank)


# ---------------------------------------------------------------- decoding


def _to_chw(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] != size or image.shape[1] != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def decode_for_training(raw: Mapping[str, Any], resolution: int, limits: ReadLimits | None = None) -> dict[str, Any]:
    """A raw webdataset sample -> float CHW arrays in [-1, 1] at ``resolution`` + the expression vector; with
    cached latents attached (``__latents__``) the images are not decoded at all, only the expression."""
    if "__latents__" in raw:
        return _decode_with_latents(raw)
    sample = decode_sample(raw, (limits or ReadLimits()).decode)
    out: dict[str, Any] = {k: _to_chw(getattr(sample, k), resolution) for k in IMAGE_KEYS}
    out["expression"] = np.asarray(sample.expression, dtype=np.float32).reshape(-1)
    out["__key__"] = sample.key
    return out


def _decode_with_latents(raw: Mapping[str, Any]) -> dict[str, Any]:
    key = raw.get("__key__")
    members = {k.lstrip("."): v for k, v in raw.items() if not k.startswith("__")}
    try:
        expression = np.load(io.BytesIO(members["expression.npy"]), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a bad member is this sample's schema fault
        raise SchemaError(f"{key}: cannot decode expression.npy: {exc}") from exc
    if expression.dtype != np.float32 or expression.ndim != 1 or not np.all(np.isfinite(expression)):
        raise SchemaError(f"{key}: expression.npy is {expression.dtype} {expression.shape}, or not finite")
    out: dict[str, Any] = {LATENT_PREFIX + k: v.numpy() for k, v in raw["__latents__"].items()}
    out["expression"] = expression
    out["__key__"] = key
    return out


def attach_latents(data: Iterator[dict[str, Any]], tag: str) -> Iterator[dict[str, Any]]:
    """Add each sample's cached latents (``__latents__``) from its shard's sidecar. Samples arrive shard by
    shard here (before any shuffle), so one sidecar is held at a time. A sidecar that cannot be read skips its
    shard's samples, and a key missing from it skips that sample, each with a logged warning."""
    url, current = None, None
    for raw in data:
        if raw.get("__url__") != url:
            url = raw.get("__url__")
            try:
                current = latent_cache.read_sidecar(url, tag)
            except Exception as exc:  # noqa: BLE001 - one bad sidecar must not stop the epoch
                log.warning("train data: latent sidecar of %s unreadable, its samples skipped: %s", url, exc)
                current = None
        if current is None:
            continue
        key = raw.get("__key__")
        if key not in current:
            log.warning("train data: %s has no cached latents in its sidecar; skipped", key)
            continue
        yield {**raw, "__latents__": current.sample(key)}


def _raw_split(raw: Mapping[str, Any]) -> str | None:
    meta = raw.get("meta.json", raw.get(".meta.json"))
    try:
        return json.loads(meta).get("split") if meta is not None else None
    except (ValueError, AttributeError):
        return None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    dims = {s["expression"].shape for s in samples}
    if len(dims) != 1:
        raise SchemaError(f"expression vectors of different sizes in one batch: {sorted(dims)}")
    kinds = {tuple(k for k in (*IMAGE_KEYS, *LATENT_KEYS) if k in s) for s in samples}
    if len(kinds) != 1:
        raise SchemaError("images and cached latents mixed in one batch")
    batch: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in kinds.pop()}
    batch["expression"] = torch.from_numpy(np.stack([s["expression"] for s in samples]))
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch


def _every_nth(data: Iterator[Any], stride: int, offset: int) -> Iterator[Any]:
    for i, item in enumerate(data):
        if i % stride == offset:
            yield item


def _only_split(data: Iterator[Mapping[str, Any]], split: str | None) -> Iterator[Mapping[str, Any]]:
    for raw in data:
        got = _raw_split(raw)
        if split is None or got is None or got == split:
            yield raw


def _quality_ok(data: Iterator[Mapping[str, Any]], keep) -> Iterator[Mapping[str, Any]]:
    for raw in data:
        if keep(raw.get("meta.json", raw.get(".meta.json"))):
            yield raw


def _read_shards(data: Iterator[Mapping[str, Any]], limits: ReadLimits) -> Iterator[dict[str, Any]]:
    """Shard URLs -> raw samples through the dataset's one reader (size limits, name checks, resumed reads).
    A sample over the limits and a shard that cannot be read are logged skips."""
    for item in data:
        url = item["url"]
        try:
            for raw in read_shard(url, limits):
                if raw.get(SKIP):
                    log.warning("train data: skipping sample %s: %s", raw["__key__"], raw[SKIP])
                    continue
                yield raw
        except (ShardError, OSError) as exc:
            log.warning("train data: skipping the rest of shard %s: %s", url, exc)


def build_pipeline(plan: RankPlan, *, batch_size: int, resolution: int, split: str | None = "train",
                   shuffle_buffer: int = 256, seed: int = 0, min_quality: float | None = None,
                   quality_filters: tuple[str, ...] = (), latents_tag: str | None = None,
                   limits: ReadLimits | None = None) -> wds.DataPipeline:
    """The webdataset pipeline of one rank for one epoch: shards -> samples -> decoded -> batches. With
    ``latents_tag`` the samples carry the shard sidecars' latents instead of decoded images.

    min_quality / quality_filters (train.min_quality, train.quality_filters): pairs below them are dropped
    here, before decoding, from meta.json["quality"] (rigface.data.quality)."""
    from rigface.data.quality import make_predicate

    keep = make_predicate(min_quality, quality_filters)
    limits = limits or ReadLimits()
    stages: list[Any] = [
        wds.SimpleShardList(plan.urls),
        wds.split_by_worker,
        wds.pipelinefilter(_read_shards)(limits),
    ]
    if latents_tag is not None:
        stages.append(wds.pipelinefilter(attach_latents)(latents_tag))
    if plan.sample_stride > 1:
        stages.append(wds.pipelinefilter(_every_nth)(plan.sample_stride, plan.sample_offset))
    stages.append(wds.pipelinefilter(_only_split)(split))
    if keep is not None:
        stages.append(wds.pipelinefilter(_quality_ok)(keep))
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 16), seed=seed))
    stages += [
        wds.map(lambda raw: decode_for_training(raw, resolution, limits), handler=warn_and_skip),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ]
    return wds.DataPipeline(*stages)


def epoch_loader(refs: list[ShardRef], *, rank: int, world: int, epoch: int, seed: int, batch_size: int,
                 resolution: int, loader_workers: int, shuffle_buffer: int, split: str | None = "train",
                 min_quality: float | None = None, quality_filters: tuple[str, ...] = (),
                 latents_tag: str | None = None, limits: ReadLimits | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's part of one epoch; decoding and batching run in background workers."""
    plan = plan_epoch(refs, rank=rank, world=world, epoch=epoch, seed=seed, batch_size=batch_size)
    pipeline = build_pipeline(plan, batch_size=batch_size, resolution=resolution, split=split,
                              shuffle_buffer=shuffle_buffer, seed=seed * 7919 + epoch * 104_729 + rank,
                              min_quality=min_quality, quality_filters=tuple(quality_filters),
                              latents_tag=latents_tag, limits=limits)
    kwargs: dict[str, Any] = {}
    if loader_workers > 0:
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=loader_workers,
                                       pin_memory=torch.cuda.is_available(), **kwargs)


def infinite_batches(refs: list[ShardRef], *, start_epoch: int = 0, **kw: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) forever, epoch after epoch; an epoch with no batch at all is an error, not a spin."""
    epoch = start_epoch
    while True:
        n = 0
        for batch in epoch_loader(refs, epoch=epoch, **kw):
            n += 1
            yield epoch, batch
        if n == 0:
            raise TrainDataError(f"epoch {epoch} of rank {kw.get('rank')} yielded no full batch "
                                 f"from {len(refs)} shard(s): too few samples or all unreadable")
        epoch += 1


def fixed_batch(refs: list[ShardRef], *, n: int, resolution: int, split: str | None,
                limits: ReadLimits | None = None) -> dict[str, Any] | None:
    """The first ``n`` decodable samples (in sorted shard order) as one batch: the fixed validation batch."""
    limits = limits or ReadLimits()
    samples: list[dict[str, Any]] = []
    shards = [{"url": u} for u, _ in sorted(refs)]
    for raw in _only_split(_read_shards(iter(shards), limits), split):
        try:
            samples.append(decode_for_training(raw, resolution, limits))
        except SchemaError as exc:
            warn_and_skip(exc)
        if len(samples) == n:
            break
    return collate(samples) if samples else None


def image_from_chw(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3,H,W) in [-1, 1] -> HxWx3 uint8."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.clip((a.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
