"""Pair sampling: per video, pairs of frames at least ``min_gap_seconds`` apart, seeded and reproducible.

The paper trains on two temporally distant frames of one sequence (source -> target). We draw a few spare
pairs up front so that when face analysis fails on a frame, its pairs are replaced from frames that passed,
without going back to decode. Face-aware sampling (`probe_indices`, `face_spans`, `sample_pairs_among`): a
cheap detection pass over a stride of frames finds where the face is, and pairs are drawn there only, so a
clip whose face shows in part of it still gives its pairs.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import numpy as np

Pair = tuple[int, int]


def _rng(seed: int, salt: str) -> np.random.Generator:
    # Salting by the video's content hash makes a video's pairs independent of listing order and of its neighbours.
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def min_gap_frames(fps: float, min_gap_seconds: float) -> int:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    return max(1, math.ceil(min_gap_seconds * fps - 1e-9))


def max_pairs(n_frames: int, gap: int) -> int:
    """How many unordered frame pairs {a, b} with |a - b| >= gap a video of n_frames has."""
    m = n_frames - gap
    return m * (m + 1) // 2 if m > 0 else 0


def sample_distant_pairs(
    n_frames: int,
    fps: float,
    n_pairs: int,
    min_gap_seconds: float,
    seed: int = 0,
    cap: int | None = None,
    salt: str = "",
) -> list[Pair]:
    """Up to ``min(n_pairs, cap)`` distinct (source, target) frame pairs, ``|b - a| >= min_gap_seconds * fps``.

    Reproducible for a given (seed, salt); direction (which frame is the source) is random. Returns fewer
    pairs (possibly none) when the video is too short to hold more.
    """
    if n_frames < 0 or n_pairs < 0:
        raise ValueError("n_frames and n_pairs must be >= 0")
    gap = min_gap_frames(fps, min_gap_seconds)
    want = min(n_pairs, cap if cap is not None else n_pairs, max_pairs(n_frames, gap))
    if want <= 0:
        return []
    rng = _rng(seed, salt)
    seen: set[frozenset[int]] = set()
    pairs: list[Pair] = []
    # Rejection sampling; when the space is nearly exhausted, fall back to enumerating it.
    for _ in range(want * 20):
        a = int(rng.integers(0, n_frames - gap))
        b = int(rng.integers(a + gap, n_frames))
        if frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        pairs.append((b, a) if rng.random() < 0.5 else (a, b))
        if len(pairs) == want:
            return pairs
    rest = [(a, b) for a in range(n_frames) for b in range(a + gap, n_frames) if frozenset((a, b)) not in seen]
    order = rng.permutation(len(rest))
    for i in order[: want - len(pairs)]:
        a, b = rest[int(i)]
        pairs.append((b, a) if rng.random() < 0.5 else (a, b))
    return pairs


def frames_of(pairs: Iterable[Pair]) -> list[int]:
    return sorted({f for p in pairs for f in p})


def replace_failed(
    candidates: Sequence[Pair],
    ok_frames: Iterable[int],
    n_pairs: int,
    gap: int,
    seed: int = 0,
    salt: str = "",
) -> list[Pair]:
    """Keep the first ``n_pairs`` candidate pairs whose frames both passed; fill the shortfall from new pairs
    of passed frames (still ``gap`` apart, not repeating a pair). Deterministic for the same inputs.
    """
    ok = sorted(set(ok_frames))
    ok_set = set(ok)
    chosen: list[Pair] = []
    seen: set[frozenset[int]] = set()
    for a, b in candidates:
        if a in ok_set and b in ok_set and frozenset((a, b)) not in seen:
            chosen.append((a, b))
            seen.add(frozenset((a, b)))
            if len(chosen) == n_pairs:
                return chosen
    rng = _rng(seed, "replace:" + salt)
    extra = [(a, b) for i, a in enumerate(ok) for b in ok[i + 1:] if b - a >= gap and frozenset((a, b)) not in seen]
    for i in rng.permutation(len(extra))[: n_pairs - len(chosen)]:
        a, b = extra[int(i)]
        chosen.append((b, a) if rng.random() < 0.5 else (a, b))
    return chosen


def probe_indices(n_frames: int, fps: float, every_seconds: float, max_probes: int) -> list[int]:
    """Frames to look for a face in before choosing pairs: one every `every_seconds`, at most `max_probes`
    (spread evenly over the whole video), always including the first and the last frame."""
    if n_frames <= 0:
        return []
    step = max(1, int(round(every_seconds * fps)), math.ceil((n_frames - 1) / max(1, max_probes - 1)))
    idx = list(range(0, n_frames, step))
    if idx[-1] != n_frames - 1 and len(idx) < max(2, max_probes):
        idx.append(n_frames - 1)
    return idx


def face_spans(probes: Sequence[int], has_face: Sequence[bool], n_frames: int) -> list[int]:
    """Frames that lie near a probe with a face: each probe stands for the frames up to halfway to its
    neighbours, so a clip whose face shows in only part of it yields candidates from that part alone."""
    frames: list[int] = []
    for i, (p, ok) in enumerate(zip(probes, has_face)):
        if not ok:
            continue
        lo = 0 if i == 0 else (probes[i - 1] + p) // 2 + 1
        hi = n_frames - 1 if i == len(probes) - 1 else (p + probes[i + 1]) // 2
        frames.extend(range(lo, hi + 1))
    return sorted(set(frames))


def sample_pairs_among(
    frames: Sequence[int], fps: float, n_pairs: int, min_gap_seconds: float, seed: int = 0, salt: str = ""
) -> list[Pair]:
    """Like `sample_distant_pairs`, but both frames of each pair come from `frames` (the frames with a face).

    Reproducible for a given (seed, salt); pairs at least min_gap_seconds apart, distinct, random direction.
    """
    allowed = np.array(sorted(set(int(f) for f in frames)), dtype=np.int64)
    gap = min_gap_frames(fps, min_gap_seconds)
    if allowed.size < 2 or n_pairs <= 0:
        return []
    rng = _rng(seed, "faces:" + salt)
    seen: set[frozenset[int]] = set()
    pairs: list[Pair] = []
    # For each a, the partners at least gap later start at index `first[i]` (allowed is sorted).
    first = np.searchsorted(allowed, allowed + gap, side="left")
    starts = np.nonzero(first < allowed.size)[0]
    if starts.size == 0:
        return []
    weights = (allowed.size - first[starts]).astype(np.float64)
    total = int(weights.sum())
    want = min(n_pairs, total)
    probs = weights / weights.sum()  # uniform over all valid pairs, not over first frames
    for _ in range(want * 20):
        i = int(starts[rng.choice(starts.size, p=probs)])
        j = int(rng.integers(first[i], allowed.size))
        a, b = int(allowed[i]), int(allowed[j])
        if frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        pairs.append((b, a) if rng.random() < 0.5 else (a, b))
        if len(pairs) == want:
            break
    return pairs
