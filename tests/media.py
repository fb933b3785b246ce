"""Test media made on the fly: short videos from photographs bundled with scikit-image, and bad inputs.

Plain functions so unit tests, integration tests and bench/ can share them. Videos are written with PyAV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512x512x3, one frontal face


def scene(size: int = 256, scale: float = 1.0, dx: int = 0, dy: int = 0, faces: int = 1,
          gray: bool = False, face: np.ndarray | None = None) -> np.ndarray:
    """A frame of `size` px holding `faces` copies of the astronaut, scaled and shifted (0 faces: the cat)."""
    from PIL import Image
    from skimage import data

    canvas = Image.new("RGB", (size * max(1, faces), size), (90, 100, 110))
    if faces == 0:
        cat = Image.fromarray(data.chelsea()).resize((size, size))
        canvas.paste(cat, (0, 0))
    src = Image.fromarray(face if face is not None else astronaut())
    side = max(8, int(size * scale))
    tile = src.resize((side, side), Image.BILINEAR)
    for k in range(faces):
        canvas.paste(tile, (k * size + (size - side) // 2 + dx, (size - side) // 2 + dy))
    out = np.asarray(canvas)
    if gray:
        out = np.repeat(np.asarray(Image.fromarray(out).convert("L"))[:, :, None], 3, axis=2)
    return out


def write_video(path: str | Path, frames, fps: int = 10, codec: str = "mpeg4",
                pix_fmt: str = "yuv420p") -> Path:
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def face_video(path: str | Path, n_frames: int = 30, fps: int = 10, size: int = 256, faces: int = 1,
               scale: float = 0.8, gray: bool = False, codec: str = "mpeg4") -> Path:
    """The astronaut drifting and zooming slightly, so frames differ (as a talking head does)."""
    frames = []
    for i in range(n_frames):
        t = i / max(1, n_frames - 1)
        frames.append(scene(size, scale=scale * (1 + 0.08 * np.sin(2 * np.pi * t)), dx=int(6 * np.cos(3 * t)),
                            dy=int(4 * np.sin(2 * t)), faces=faces, gray=gray))
    return write_video(path, frames, fps=fps, codec=codec)


def audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    import av

    path = Path(path)
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        for start in range(0, n, 1024):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate = 16000
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def truncated(src: str | Path, dst: str | Path, keep: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def corrupt(src: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """Random bytes over most of the file (header included): undecodable."""
    rng = np.random.default_rng(seed)
    data = bytearray(Path(src).read_bytes())
    junk = rng.integers(0, 256, size=len(data) - 16, dtype=np.uint8).tobytes()
    data[16:] = junk
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def bad_inputs(folder: str | Path, good: str | Path) -> dict[str, Path]:
    """The file-level bad inputs of issue 5 (no decoding needed to make them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    return {
        "zero": folder / "zero.mp4",
        "text": folder / "text.mp4",
        "truncated": truncated(good, folder / "truncated.mp4"),
        "corrupt": corrupt(good, folder / "corrupt.mp4"),
        "audio": audio_only(folder / "audio.mp4"),
    }
