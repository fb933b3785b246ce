"""Face analysis speed on this CPU: ms per 512 crop for each stage, frames/s for the whole analyzer, and
each figure as a ratio to the detector alone (measured in the same run).

    .venv/bin/python bench/face.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _time(fn, repeats: int) -> float:
    """Median milliseconds per call: the median resists the other processes sharing these cores."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000.0


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
    base = rows[0][1]
    print(f"face analysis on this CPU, {n} repeats, models loaded in {load_ms:.0f} ms; det score {det.score:.2f}")
    print(f"{'stage':<36}{'ms/frame':>10}{'x detector':>12}")
    for name, ms in rows:
        print(f"{name:<36}{ms:>10.1f}{ms / base:>12.2f}")
    whole = rows[-1][1]
    print(f"{'analyzer throughput':<36}{1000 / whole:>10.1f} frames/s (one thread)")
    an.close()


if __name__ == "__main__":
    main()
