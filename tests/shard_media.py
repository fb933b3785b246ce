"""Synthetic shards for tests that need shards but not face analysis (train, data loaders)."""

from __future__ import annotations

import numpy as np

from rigface.data.dataset import Dataset
from rigface.data.schema import PairSample, encode_sample, safe_video_id, sample_key


def synthetic_pair(video: str, a: int, b: int, size: int = 32, dim: int = 8, split: str = "train") -> PairSample:
    rng = np.random.default_rng(a * 1000 + b)
    img = lambda: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noqa: E731
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    meta = {"video_id": video, "frames": [a, b], "times": [a / 10, b / 10], "split": split,
            "boxes": {"source": [0, 0, size, size], "target": [0, 0, size, size]},
            "pose": {"source": [0, 0, 0], "target": [1, 2, 3]}, "lighting": {"source": [0.1] * 9, "target": [0.2] * 9},
            "backends": {"test": "1"}, "scores": {"det": 1.0},
            # Quality fields that vary with the frame index, so filters and rankings have something to sort.
            "quality": {"score": round((a % 10) / 10, 3), "face_size": 100.0 + a, "sharpness": 50.0 + 10 * a,
                        "landmark_confidence": 0.9, "padded_fraction": 0.0, "pose_delta": 5.0,
                        "expression_delta": 0.5, "lighting_delta": 0.1}}
    return PairSample(key=sample_key(video, a, b), source=img(), target=img(), render=img(), background=img(),
                      expression=rng.standard_normal(dim).astype(np.float32), mask_source=mask, mask_target=mask,
                      meta=meta)


def write_synthetic_shards(root: str, n_shards: int, per_shard: int, size: int = 32, dim: int = 8,
                           split: str = "train") -> list[str]:
    urls = []
    for s in range(n_shards):
        video = safe_video_id(f"vid{split}{s}")
        samples = [synthetic_pair(video, i, i + 10, size, dim, split) for i in range(per_shard)]
        ds = Dataset(root)
        url = ds.shard_url(split, 1, s)
        ds.write_shard(url, [(p.key, encode_sample(p)) for p in samples])
        urls.append(url)
    return urls
