"""Sample portrait videos made offline from face photographs that ship inside installed packages.

No downloads: the photographs are scikit-image's ``astronaut`` (Eileen Collins, public domain) and ``camera``
(the cameraman), and matplotlib's ``grace_hopper.jpg`` (public domain). Each video moves, scales, tilts and
relights one photograph over time, so two frames of it differ in head pose (2D) and lighting the way two
frames of a talking-head clip do, while the identity stays the same.

    paths = make_sample_videos("videos/", n_videos=6, seconds=4, fps=8, size=256)
    portraits = sample_portraits()   # {"astronaut": rgb, "grace_hopper": rgb, "cameraman": rgb}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class SampleError(RuntimeError):
    """A bundled photograph is missing (its package is not installed) or a video cannot be written."""


@dataclass(frozen=True)
class _Photo:
    load: Callable[[], np.ndarray]
    # Face centre (x, y) and face size (px) in the photo, read off the YuNet box once: where the camera aims.
    center: tuple[float, float]
    face: float


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(data.astronaut())


def _cameraman() -> np.ndarray:
    from skimage import data

    gray = np.asarray(data.camera())
    return np.repeat(gray[:, :, None], 3, axis=2)


def _grace_hopper() -> np.ndarray:
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise SampleError("matplotlib is not installed: it ships grace_hopper.jpg")
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    if not path.exists():
        raise SampleError(f"matplotlib's sample photo is missing: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


PHOTOS: dict[str, _Photo] = {
    "astronaut": _Photo(_astronaut, center=(223.0, 112.0), face=113.0),
    "grace_hopper": _Photo(_grace_hopper, center=(257.0, 211.0), face=213.0),
    "cameraman": _Photo(_cameraman, center=(229.0, 150.0), face=80.0),
}


def sample_portraits() -> dict[str, np.ndarray]:
    """The bundled photographs, one per person, as uint8 RGB arrays (name -> image)."""
    return {name: photo.load() for name, photo in PHOTOS.items()}


def _frame(photo: np.ndarray, spec: _Photo, size: int, t: float, seed: int) -> np.ndarray:
    """One frame at time t in [0, 1]: the photo warped (shift, zoom, tilt) around its face, then relit."""
    import cv2

    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * np.pi, 4)  # per-video phases: each video moves its own way
    wave = 2 * np.pi * t
    angle = 9.0 * math.sin(wave + ph[0])  # degrees of in-plane head tilt
    zoom = 1.0 + 0.12 * math.sin(0.7 * wave + ph[1])
    dx = 0.08 * size * math.sin(wave + ph[2])
    dy = 0.06 * size * math.cos(1.3 * wave + ph[3])
    # The face takes ~40% of the frame: well above face.min_face_size at the demo's sizes.
    scale = zoom * 0.4 * size / spec.face
    m = cv2.getRotationMatrix2D(spec.center, angle, scale)
    m[0, 2] += size / 2 + dx - spec.center[0]
    m[1, 2] += size / 2 + dy - spec.center[1]
    img = cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    # Relighting: a directional gain whose direction turns over time, a slow brightness swing and a colour cast.
    theta = wave * 0.8 + ph[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size / 2) - 1.0
    gain = 1.0 + 0.35 * (xx * math.cos(theta) + yy * math.sin(theta))
    gain *= 0.9 + 0.15 * math.sin(0.5 * wave + ph[2])
    tint = np.array([1.0 + 0.08 * math.sin(wave), 1.0, 1.0 - 0.08 * math.sin(wave)], np.float32)
    lit = img.astype(np.float32) * gain[:, :, None] * tint
    return np.clip(lit + 0.5, 0, 255).astype(np.uint8)


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_sample_videos(folder: str | Path, n_videos: int = 6, seconds: float = 4.0, fps: int = 8,
                       size: int = 256, people: tuple[str, ...] | None = None) -> list[Path]:
    """Write ``n_videos`` short mp4 portrait videos into ``folder``; returns their paths.

    Videos go round-robin over the people (``people`` defaults to every bundled photo), so every person gets
    several clips; each clip moves and relights its photo in its own way (seeded by its index: reproducible).
    """
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    if seconds <= 0 or fps < 1 or size < 64 or size % 2:
        raise ValueError(f"need seconds > 0, fps >= 1 and an even size >= 64 (got {seconds}, {fps}, {size})")
    names = tuple(people or PHOTOS)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown sample people {unknown}; known: {sorted(PHOTOS)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    photos = {n: PHOTOS[n].load() for n in names}
    n_frames = max(2, int(round(seconds * fps)))
    paths = []
    for i in range(n_videos):
        name = names[i % len(names)]
        frames = [_frame(photos[name], PHOTOS[name], size, k / (n_frames - 1), seed=i) for k in range(n_frames)]
        path = out / f"{name}_{i // len(names):02d}.mp4"
        try:
            _write_mp4(path, frames, fps)
        except Exception as exc:  # noqa: BLE001 - any encoder failure becomes one typed error
            raise SampleError(f"cannot write {path}: {exc}") from exc
        paths.append(path)
    log.info("wrote %d sample videos (%d frames each) to %s", len(paths), n_frames, out)
    return paths
