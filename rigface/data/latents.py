"""Latent sidecars: the frozen VAE's latents of each shard's images, stored beside the shard.

Layout, beside ``train/shard-v001-000000.tar``::

    train/shard-v001-000000.latents-{vae_id}-r{resolution}.safetensors   the latents of every sample
    train/shard-v001-000000.latents-{vae_id}-r{resolution}.done.json     commit marker, written last

``vae_id`` is a hash of the VAE's config and weights (``vae_identity``), so a different VAE (or another
resolution) never reuses latents; several VAEs' sidecars can live side by side. The names end neither in
``.tar`` nor in ``.stats.json``, so shard listings never mistake a sidecar for a shard or a shard marker.

One safetensors file per shard holds stacked tensors, one row per sample, in the order of the ``keys`` list in
its metadata: ``source``, ``background``, ``render`` (the posterior's mode, unscaled: what the released model
conditions on) and ``target_mean``, ``target_std`` (the trainer samples the target latent from the posterior
every step, as the uncached path does). This module owns the names, the identity and the file format; it has
no torch-heavy imports at module level.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from rigface.data import storage

FORMAT = "rigface-latents-1"
LATENT_KEYS = ("source", "background", "render", "target_mean", "target_std")
SIDECAR_SUFFIX = ".safetensors"
MARKER_SUFFIX = ".done.json"
_TAG_SEP = ".latents-"


class LatentCacheError(ValueError):
    """A sidecar that does not belong to its shard or VAE, or that is not in the expected format."""


def cache_tag(vae_id: str, resolution: int) -> str:
    return f"{vae_id}-r{int(resolution)}"


def sidecar_url(shard_url: str, tag: str) -> str:
    if not shard_url.endswith(".tar"):
        raise ValueError(f"not a shard URL (.tar): {shard_url}")
    return f"{shard_url[:-4]}{_TAG_SEP}{tag}{SIDECAR_SUFFIX}"


def marker_url(shard_url: str, tag: str) -> str:
    return sidecar_url(shard_url, tag)[: -len(SIDECAR_SUFFIX)] + MARKER_SUFFIX


def complete_tags(shard_urls: Iterable[str], listed_urls: Iterable[str]) -> set[str]:
    """The cache tags for which every shard in ``shard_urls`` has a committed sidecar (from one listing)."""
    shards = list(shard_urls)
    if not shards:
        return set()
    listed = set(listed_urls)
    tags_per_shard = []
    for shard in shards:
        stem = shard[:-4] + _TAG_SEP
        tags = {u[len(stem):-len(MARKER_SUFFIX)] for u in listed
                if u.startswith(stem) and u.endswith(MARKER_SUFFIX)}
        tags_per_shard.append({t for t in tags if sidecar_url(shard, t) in listed})
    return set.intersection(*tags_per_shard)


def vae_identity(vae) -> str:
    """16 hex digits of sha256 over the VAE's architecture config and its weights (float32 bytes, by name)."""
    import torch

    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ShardLatents:
    """The latents of one shard: key -> row, and the stacked tensors."""

    keys: list[str]
    tensors: dict[str, Any]  # name -> torch.Tensor (N, 4, h, w)
    metadata: dict[str, str]

    def __post_init__(self):
        self._row = {k: i for i, k in enumerate(self.keys)}

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def sample(self, key: str) -> dict[str, Any]:
        """name -> (4, h, w) float32 tensor for one sample key."""
        i = self._row[key]
        return {name: t[i].float() for name, t in self.tensors.items()}


def encode_sidecar(keys: list[str], tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> bytes:
    """safetensors bytes of stacked latents; ``keys`` and ``metadata`` go to the file's string metadata."""
    from safetensors.torch import save

    missing = [k for k in LATENT_KEYS if k not in tensors]
    if missing:
        raise LatentCacheError(f"latents lack {missing}")
    for name in LATENT_KEYS:
        if tensors[name].shape[0] != len(keys):
            raise LatentCacheError(f"{name} has {tensors[name].shape[0]} rows for {len(keys)} keys")
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, keys=json.dumps(list(keys)))
    return save({k: tensors[k].contiguous() for k in LATENT_KEYS}, metadata=meta)


def decode_sidecar(data: bytes, expect_tag: str | None = None) -> ShardLatents:
    from safetensors.torch import load

    try:  # the safetensors header: 8 bytes of length, then JSON whose __metadata__ holds our strings
        n = struct.unpack("<Q", data[:8])[0]
        meta = dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LatentCacheError(f"not a safetensors sidecar: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise LatentCacheError(f"sidecar format {meta.get('format')!r}, expected {FORMAT!r}")
    if expect_tag is not None and meta.get("tag") != expect_tag:
        raise LatentCacheError(f"sidecar made for {meta.get('tag')!r}, expected {expect_tag!r}")
    try:
        tensors = load(data)
        keys = json.loads(meta["keys"])
        return ShardLatents(keys, {k: tensors[k] for k in LATENT_KEYS}, meta)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is a bad sidecar, not a crash
        raise LatentCacheError(f"unreadable sidecar: {exc}") from exc


def read_sidecar(shard_url: str, tag: str) -> ShardLatents:
    return decode_sidecar(storage.read_bytes(sidecar_url(shard_url, tag)), expect_tag=tag)


def write_sidecar(shard_url: str, tag: str, keys: list[str], tensors: Mapping[str, Any],
                  stats: Mapping[str, Any]) -> dict[str, Any]:
    """Write the sidecar (atomic), then its marker (the commit). Returns the marker's contents."""
    data = encode_sidecar(keys, tensors, {**{k: v for k, v in stats.items() if isinstance(v, (str, int, float))},
                                          "tag": tag, "shard": shard_url.rsplit("/", 1)[-1]})
    storage.write_bytes(sidecar_url(shard_url, tag), data)
    out = {**dict(stats), "tag": tag, "shard": shard_url.rsplit("/", 1)[-1], "samples": len(keys),
           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "format": FORMAT}
    storage.write_text(marker_url(shard_url, tag), json.dumps(out, indent=1, sort_keys=True))
    return out


def is_done(shard_url: str, tag: str) -> bool:
    return storage.exists(marker_url(shard_url, tag))
