"""Latent sidecars: layout, VAE identity, the trainer's cached path equal to the VAE path, the data loader."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from shard_media import write_synthetic_shards

DIM = 8


@pytest.fixture(scope="module")
def tiny():
    from rigface.model import ModelConfig, build_rigface

    return build_rigface(ModelConfig(preset="tiny", resolution=64, expression_dim=DIM))


def _encode_shards(urls, vae, resolution=64, dtype=torch.float32, drop_key=None):
    """What the `rigface latents` actor writes, done in-process (the Ray job itself is in the integration test)."""
    from pipelines.train_data import decode_for_training
    from rigface.data import latents as cache
    from rigface.data.dataset import read_shard
    from rigface.model.training import cacheable_latents

    tag = cache.cache_tag(cache.vae_identity(vae), resolution)
    for url in urls:
        samples = [decode_for_training(raw, resolution) for raw in read_shard(url)]
        samples = [s for s in samples if s["__key__"] != drop_key]
        images = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
                  for k in ("source", "target", "background", "render")}
        lat = {k: v.to(dtype) for k, v in cacheable_latents(vae, images).items()}
        cache.write_sidecar(url, tag, [s["__key__"] for s in samples], lat, {"resolution": resolution})
    return tag


def test_sidecar_names_never_look_like_shards_and_tags_need_every_shard(tmp_path, tiny):
    from pipelines.train_data import list_shards
    from rigface.data import latents as cache
    from rigface.data import storage

    urls = write_synthetic_shards(str(tmp_path), n_shards=2, per_shard=3, size=64, dim=DIM)
    tag = _encode_shards(urls[:1], tiny.vae)
    assert [u for u, _ in list_shards(str(tmp_path))] == sorted(urls)  # sidecars and their markers are not shards
    listed = storage.list_urls(str(tmp_path))
    assert cache.complete_tags(urls, listed) == set()  # shard 2 has none yet
    assert cache.complete_tags(urls[:1], listed) == {tag}
    _encode_shards(urls[1:], tiny.vae)
    assert cache.complete_tags(urls, storage.list_urls(str(tmp_path))) == {tag}
    # A sidecar without its marker (a crash between the two writes) does not count.
    storage.delete(cache.marker_url(urls[1], tag))
    assert cache.complete_tags(urls, storage.list_urls(str(tmp_path))) == set()


def test_vae_identity_follows_weights_and_build_vae_matches_build_rigface(tiny):
    from rigface.data.latents import vae_identity
    from rigface.model import ModelConfig
    from rigface.model.build import build_vae

    vae = build_vae(ModelConfig(preset="tiny", resolution=64, expression_dim=DIM))
    assert vae_identity(vae) == vae_identity(tiny.vae)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert vae_identity(vae) != vae_identity(tiny.vae)


def test_sidecar_round_trip_and_bad_files_are_typed_errors(tmp_path, tiny):
    from rigface.data import latents as cache
    from rigface.data import storage

    urls = write_synthetic_shards(str(tmp_path), n_shards=1, per_shard=3, size=64, dim=DIM)
    tag = _encode_shards(urls, tiny.vae, dtype=torch.float16)
    got = cache.read_sidecar(urls[0], tag)
    assert len(got.keys) == 3 and got.metadata["tag"] == tag
    one = got.sample(got.keys[0])
    assert set(one) == set(cache.LATENT_KEYS) and one["source"].shape == (4, 8, 8) and one["source"].dtype == torch.float32
    with pytest.raises(cache.LatentCacheError, match="made for"):
        cache.decode_sidecar(storage.read_bytes(cache.sidecar_url(urls[0], tag)), expect_tag="other-r64")
    with pytest.raises(cache.LatentCacheError):
        cache.decode_sidecar(b"\x00" * 7)
    with pytest.raises(cache.LatentCacheError):
        cache.decode_sidecar(storage.read_bytes(cache.sidecar_url(urls[0], tag))[:-100])


def test_training_step_on_cached_latents_equals_the_vae_path(tmp_path, tiny, one_thread):
    from pipelines.train_data import fixed_batch, plan_epoch, build_pipeline
    from rigface.model.training import training_step

    urls = write_synthetic_shards(str(tmp_path), n_shards=1, per_shard=4, size=64, dim=DIM)
    tag = _encode_shards(urls, tiny.vae)  # float32 storage: the two paths must agree to rounding
    plan = plan_epoch([(u, 4) for u in urls], rank=0, world=1, epoch=0, seed=0)
    cached = next(iter(build_pipeline(plan, batch_size=4, resolution=64, shuffle_buffer=0, latents_tag=tag)))
    images = fixed_batch([(u, 4) for u in urls], n=4, resolution=64, split="train")
    assert cached["__key__"] == images["__key__"]
    assert "source" not in cached and "latent_source" in cached  # no image was decoded
    tensors = lambda b: {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    with torch.no_grad():
        a = training_step(tiny, tensors(images), generator=torch.Generator().manual_seed(3))
        b = training_step(tiny, tensors(cached), generator=torch.Generator().manual_seed(3))
        c = training_step(tiny, tensors(cached), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    assert not torch.allclose(b, c)  # the noise differs with the seed: the comparison above can fail


def test_loader_skips_samples_a_sidecar_lacks_and_shards_whose_sidecar_is_unreadable(tmp_path, tiny, caplog):
    from pipelines.train_data import build_pipeline, plan_epoch
    from rigface.data import latents as cache
    from rigface.data import storage
    from rigface.data.dataset import read_shard

    urls = write_synthetic_shards(str(tmp_path), n_shards=2, per_shard=3, size=64, dim=DIM)
    dropped = next(read_shard(urls[0]))["__key__"]
    tag = _encode_shards(urls, tiny.vae, drop_key=dropped)
    storage.write_bytes(cache.sidecar_url(urls[1], tag), b"not safetensors")
    plan = plan_epoch([(u, 3) for u in urls], rank=0, world=1, epoch=0, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = list(build_pipeline(plan, batch_size=1, resolution=64, shuffle_buffer=0, latents_tag=tag))
    keys = [b["__key__"][0] for b in batches]
    assert len(keys) == 2 and dropped not in keys  # 3 in shard 1 minus the dropped one; shard 2 skipped
    assert "no cached latents" in caplog.text and "unreadable" in caplog.text
