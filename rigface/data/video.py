"""Video decoding with decord: open, probe, and read selected frames, with a typed error for any bad file.

Every failure (zero bytes, not a video, audio only, truncated, corrupt, unreadable frames) raises
``VideoError`` with a stable ``reason`` string that the pipeline counts in shard stats.
Frames larger than ``max_side`` are decoded downscaled (decord resizes inside the decoder).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class VideoError(RuntimeError):
    """A video that cannot be used. ``reason`` is one of: empty, unreadable, no_video_stream, no_frames,
    decode_failed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int
    fps: float
    height: int       # of the decoded frames (after any downscale)
    width: int
    orig_height: int
    orig_width: int

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def downscaled(self) -> bool:
        return (self.height, self.width) != (self.orig_height, self.orig_width)


def _open(path: str, width: int = -1, height: int = -1):
    import decord

    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as exc:  # noqa: BLE001 - decord raises RuntimeError or DECORDError for every bad file
        text = str(exc)
        if "video stream" in text:
            raise VideoError("no_video_stream", "no video stream (audio only?)") from None
        raise VideoError("unreadable", text.splitlines()[0][:200] if text else type(exc).__name__) from None


def scaled_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled so the longer side is at most max_side, even numbers (decoders prefer them)."""
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return height, width
    return max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2)


class Video:
    """An opened video file. ``read(indices)`` returns RGB uint8 frames, (N, H, W, 3)."""

    def __init__(self, path: str | os.PathLike[str], max_side: int = 4096) -> None:
        self.path = os.fspath(path)
        p = Path(self.path)
        if not p.is_file():
            raise VideoError("unreadable", "not a file")
        if p.stat().st_size == 0:
            raise VideoError("empty", "zero-byte file")
        vr = _open(self.path)
        n = len(vr)
        fps = float(vr.get_avg_fps() or 0.0)
        if n <= 0:
            raise VideoError("no_frames", "the video stream holds no frames")
        if not (fps > 0 and math.isfinite(fps)):
            raise VideoError("unreadable", f"bad frame rate {fps}")
        try:
            first = vr[0].shape
        except Exception as exc:  # noqa: BLE001
            raise VideoError("decode_failed", f"first frame: {exc}"[:200]) from None
        oh, ow = int(first[0]), int(first[1])
        h, w = scaled_size(oh, ow, max_side)
        if (h, w) != (oh, ow):
            # Reopen with decoder-side resizing so a huge frame never sits in memory at full size twice.
            log.info("video: downscaling", extra={"path": self.path, "from": (oh, ow), "to": (h, w)})
            del vr
            vr = _open(self.path, width=w, height=h)
        self._vr = vr
        self.info = VideoInfo(n_frames=n, fps=fps, height=h, width=w, orig_height=oh, orig_width=ow)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.info.n_frames]
        if bad:
            raise VideoError("decode_failed", f"frame indices out of range: {bad[:5]}")
        if not idx:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        try:
            frames = self._vr.get_batch(idx).asnumpy()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams fail here
            raise VideoError("decode_failed", str(exc).splitlines()[0][:200] if str(exc) else repr(exc)) from None
        if frames.ndim == 3:  # some decoders hand back gray frames
            frames = np.repeat(frames[..., None], 3, axis=3)
        if frames.shape[0] != len(idx) or frames.shape[-1] != 3:
            raise VideoError("decode_failed", f"decoder returned {frames.shape} for {len(idx)} frames")
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def read_each(self, indices: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Frames that decode, and the reason for each that does not (one bad frame does not sink the rest)."""
        try:
            batch = self.read(indices)
            return {int(i): f for i, f in zip(indices, batch)}, {}
        except VideoError:
            pass
        good: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for i in indices:
            try:
                good[int(i)] = self.read([i])[0]
            except VideoError as exc:
                failed[int(i)] = exc.reason
        return good, failed

    def close(self) -> None:
        self._vr = None

    def __enter__(self) -> "Video":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(path: str | os.PathLike[str], max_side: int = 4096) -> VideoInfo:
    with Video(path, max_side=max_side) as v:
        return v.info
