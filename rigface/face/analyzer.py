"""The FaceAnalyzer facade: RGB frame -> FaceFit | FaceSkip."""

from __future__ import annotations

import logging

import numpy as np

from rigface.face import assets, geometry, quality
from rigface.face.config import FaceConfig
from rigface.face.detect import crop_box_for, extract_crop, fit_box_in_frame, make_detector, padded_fraction
from rigface.face.types import MESH_VERTICES, BackendUnavailable, Detection, FaceFit, FaceSkip, Pose, SkipReason

log = logging.getLogger(__name__)


def normalize_frame(frame) -> np.ndarray | FaceSkip:
    """uint8 RGB HxWx3 from RGB, RGBA, grayscale HxW / HxWx1, or float images in [0, 1]; else a bad_image skip."""
    try:
        img = np.asarray(frame)
    except Exception as exc:  # objects numpy cannot make an array of
        return FaceSkip(SkipReason.bad_image, f"not an array: {type(frame).__name__} ({exc})")
    if img.dtype == object or img.size == 0:
        return FaceSkip(SkipReason.bad_image, f"empty or non-numeric image (dtype {img.dtype}, shape {img.shape})")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        return FaceSkip(SkipReason.bad_image, f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    img = img[..., :3]
    if img.dtype == np.bool_:
        return FaceSkip(SkipReason.bad_image, "boolean image")
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            return FaceSkip(SkipReason.bad_image, "image holds NaN or inf")
        img = np.clip(img * 255.0 if img.max() <= 1.0 else img, 0, 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            img = np.clip(img, 0, 255).astype(np.uint8)
    if min(img.shape[:2]) < 16:
        return FaceSkip(SkipReason.bad_image, f"image too small: {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)


# MediaPipe landmark ids of the five points: iris centres, nose tip, mouth corners.
_FIVE_POINT_IDS = ((468, 473), 1, (61, 291))


def five_points_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) image-left eye, image-right eye, nose tip, image-left and image-right mouth corners."""
    lm = np.asarray(landmarks, dtype=np.float32)[:, :2]
    eyes = lm[list(_FIVE_POINT_IDS[0])]
    mouth = lm[list(_FIVE_POINT_IDS[2])]
    eyes, mouth = eyes[np.argsort(eyes[:, 0])], mouth[np.argsort(mouth[:, 0])]
    return np.concatenate([eyes, lm[[_FIVE_POINT_IDS[1]]], mouth], 0)


class FaceAnalyzer:
    """Detect, crop, fit and mask one face per frame, with the backends chosen in `FaceConfig`.

    Build once per process or Ray actor and reuse: construction loads the models (~0.3 s); `analyze` then
    costs tens of milliseconds per frame. Thread safety: each model call is serialised by a lock inside its
    wrapper (MediaPipe graphs and cv2 nets are not re-entrant), so sharing one analyzer between threads is
    safe but not parallel; for parallelism use one analyzer per thread/process. Not picklable: build it
    inside the actor, not in the driver.
    """

    def __init__(self, cfg: FaceConfig | None = None):
        from rigface.face.landmarker import Landmarker
        from rigface.face.mask import make_mask_backend

        from rigface.face.backends import preflight

        self.cfg = cfg = cfg or FaceConfig()
        if cfg.fit not in ("landmarker", "deca"):
            raise BackendUnavailable(f"fit {cfg.fit!r}: use 'landmarker' or 'deca'")
        preflight(cfg)  # every user-supplied file named in one error, before any model loads
        self.detector = make_detector(cfg.detector, cfg)
        self.landmarker = Landmarker(min_confidence=0.3)
        self.masker = make_mask_backend(cfg.mask, cfg)
        self.deep3d = None
        if cfg.expression == "deep3d":
            from rigface.face.backends import make_deep3d

            self.deep3d = make_deep3d(cfg)
        self.deca = None
        if cfg.fit == "deca":  # pose, lighting and the FLAME mesh; the landmarker still gives masks and points
            from rigface.face.backends import make_deca

            self.deca = make_deca(cfg)
        self.mesh = assets.canonical_mesh()
        self.crop_policy = cfg.crop_policy if cfg.crop_policy != "auto" else (
            "paper" if cfg.detector == "insightface" else "default")
        self.backends = {
            "detector": f"{self.detector.name}:{self.detector.version}",
            "crop": self.crop_policy,
            "fit": f"{self.landmarker.name}:{self.landmarker.version}",
            "expression": f"deep3d:{self.deep3d.version}" if self.deep3d is not None else "blendshapes52",
            "lighting": "sh9-robust-skin",
            "mask": f"{self.masker.name}:{self.masker.version}",
            "renderer": "rigface-head-numba",
        }
        if self.deca is not None:
            self.backends.update({"fit": f"deca:{self.deca.version}+flame", "lighting": "deca-sh9",
                                  "landmarks": f"{self.landmarker.name}:{self.landmarker.version}"})

    # -- stages, public so the benchmark can time them -------------------------------------------
    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Detections in frame pixels; large frames are detected on a downscaled copy."""
        import cv2

        h, w = rgb.shape[:2]
        k = min(1.0, self.cfg.detect_max_side / max(h, w))
        small = rgb if k >= 1.0 else cv2.resize(rgb, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
        dets = self.detector.detect(small)
        if k >= 1.0:
            return dets
        out = []
        for d in dets:
            kp = None if d.keypoints is None else d.keypoints / k
            out.append(Detection(tuple(v / k for v in d.box), d.score, kp))
        return out

    def choose(self, dets: list[Detection]) -> Detection | FaceSkip:
        if not dets:
            return FaceSkip(SkipReason.no_face, "the detector found no face")
        confident = [d for d in dets if d.score >= self.cfg.min_confidence]
        if not confident:
            best = max(d.score for d in dets)
            return FaceSkip(SkipReason.low_confidence, f"best detection score {best:.3f} < {self.cfg.min_confidence}")
        if len(confident) > 1 and self.cfg.multi_face == "skip":
            return FaceSkip(SkipReason.several_faces, f"{len(confident)} faces (multi_face=skip)")
        det = max(confident, key=lambda d: d.area)
        if det.size < self.cfg.min_face_size:
            return FaceSkip(SkipReason.too_small, f"face {det.size:.0f}px < min_face_size {self.cfg.min_face_size}px")
        return det

    def analyze(self, frame, crop_box: tuple[int, int, int, int] | None = None) -> FaceFit | FaceSkip:
        """One frame -> FaceFit, or FaceSkip with the reason. Never raises for bad input.

        crop_box: optional fixed box (source pixels), e.g. one box for a whole video; detection still
        runs to check that a face is there, but the crop is taken from this box.
        """
        rgb = normalize_frame(frame)
        if isinstance(rgb, FaceSkip):
            return rgb
        try:
            chosen = self.choose(self.detect(rgb))
            if isinstance(chosen, FaceSkip):
                return chosen
            if crop_box is None and self.crop_policy == "paper":
                from rigface.face.backends.insightface import paper_crop

                # The authors' crop as they take it (black outside the frame); its padding is recorded, not refused.
                crop, m, box = paper_crop(rgb, chosen.box, self.cfg.crop_size)
                padded = padded_fraction(box, rgb.shape[:2])
            else:
                box = tuple(int(v) for v in crop_box) if crop_box is not None else crop_box_for(
                    chosen, self.cfg.crop_scale, self.cfg.crop_step
                )
                if box[2] - box[0] < 8 or box[3] - box[1] < 8:
                    return FaceSkip(SkipReason.bad_image, f"crop box {box} is degenerate")
                if crop_box is None:  # a box given by the caller is taken as it is
                    box, padded = fit_box_in_frame(box, rgb.shape[:2], self.cfg.crop_min_scale * chosen.size)
                else:
                    padded = padded_fraction(box, rgb.shape[:2])
                if padded > self.cfg.max_padded_fraction:
                    return FaceSkip(SkipReason.too_much_padding, f"{padded:.2f} of the crop lies outside the "
                                    f"frame > {self.cfg.max_padded_fraction}")
                crop = extract_crop(rgb, box, self.cfg.crop_size, self.cfg.crop_pad_mode)
                kx, ky = self.cfg.crop_size / (box[2] - box[0]), self.cfg.crop_size / (box[3] - box[1])
                m = np.array([[kx, 0.0, -kx * box[0]], [0.0, ky, -ky * box[1]]])
            corners = np.array(chosen.box, np.float64).reshape(2, 2) @ m[:, :2].T + m[:, 2]
            face_box = tuple(float(v) for v in corners.ravel())  # in crop pixels
            five = None if chosen.keypoints is None else (
                np.asarray(chosen.keypoints, np.float64) @ m[:, :2].T + m[:, 2]).astype(np.float32)
            scores = {"detection": chosen.score, "padded_fraction": round(padded, 6), "face_size": chosen.size}
            return self.fit_crop(crop, box, rgb.shape[:2], scores, face_box=face_box, five_points=five)
        except Exception as exc:  # a model failing on one odd frame must not kill a dataset job
            log.warning("face fit failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return FaceSkip(SkipReason.fit_failed, f"{type(exc).__name__}: {exc}")

    def fit_crop(
        self, crop: np.ndarray, box: tuple[int, int, int, int], frame_size: tuple[int, int], scores: dict,
        face_box: tuple[float, float, float, float] | None = None, five_points: np.ndarray | None = None,
    ) -> FaceFit | FaceSkip:
        """face_box: the detector's tight face box in crop pixels (kept for callers; DECA crops by the 68 landmarks).

        five_points: the detector's five points in crop pixels (image-left eye first), which Deep3DFaceRecon is
        aligned by, as the authors do with SCRFD's; else the landmarker's.
        """
        lm = self.landmarker(crop)
        if lm is None:
            return FaceSkip(SkipReason.fit_failed, "the landmarker found no face in the crop")
        import cv2

        # GrabCut seeds its colour models from OpenCV's per-thread RNG, which every call advances: reseed so a
        # frame's mask depends on the frame alone, not on which actor saw which frames before (shards must be
        # identical whatever the pool size or a retry).
        cv2.setRNGSeed(0)
        mask = self.masker(crop, lm.landmarks)
        scores = dict(scores)
        scores.update(quality.crop_quality(crop, lm.landmarks, five_points))
        if self.deca is not None:
            from rigface.face.backends.deca_fit import DecaFitError, fit_deca, landmarks68_box

            try:  # DECA's crop from the 68-landmark box, as the authors' FAN run on the crop
                parts = fit_deca(self.deca, crop, landmarks68_box(lm.landmarks))
            except DecaFitError as exc:
                return FaceSkip(SkipReason.fit_failed, str(exc))
            scores = dict(scores, deca_cam_scale=float(parts["deca"]["codes"]["cam"][0]))
        else:
            parts, scores = self._fit_landmarker_mesh(crop, lm, scores)
        expression = lm.blendshapes
        if self.deep3d is not None:  # the paper's 64 BFM expression coefficients, from the landmarks' five points
            five = five_points if five_points is not None else five_points_from_landmarks(lm.landmarks)
            d3d = self.deep3d(crop, five)
            expression = d3d.expression
            scores.update({f"deep3d_{k}": float(v) for k, v in zip(("yaw", "pitch", "roll"), d3d.angles_deg)})
        return FaceFit(
            crop_box=box,
            crop=crop,
            landmarks=lm.landmarks,
            expression=expression,
            mask=mask,
            scores=scores,
            backends=dict(self.backends),
            frame_size=(int(frame_size[0]), int(frame_size[1])),
            mediapipe_transform=lm.transform,
            **parts,
        )

    def _fit_landmarker_mesh(self, crop: np.ndarray, lm, scores: dict) -> tuple[dict, dict]:
        """Pose, lighting, albedo and shape from the 468 landmarks (the default 3D fit)."""
        mesh = lm.landmarks[:MESH_VERTICES].copy()
        scale, rot, t, shape = geometry.fit_pose(mesh, self.mesh.vertices)
        yaw, pitch, roll = geometry.euler_from_rotation(rot)
        tx, ty, tz = geometry.view_to_image(np.asarray(t, dtype=np.float32))
        pose = Pose(yaw=yaw, pitch=pitch, roll=roll, translation=(float(tx), float(ty), float(tz)), scale=scale)
        normals = geometry.vertex_normals(geometry.image_to_view(mesh), self.mesh.triangles)
        lighting, albedo, rmse = geometry.fit_lighting(crop, mesh, normals)
        fit_resid = float(
            np.sqrt(np.mean((geometry.pose_mesh(self.mesh.vertices, scale, rot, t) - mesh) ** 2)) / max(scale, 1e-6)
        )
        parts = {"pose": pose, "transform": geometry.similarity_matrix(scale, rot, t), "lighting": lighting,
                 "albedo": albedo, "mesh": mesh, "shape": shape}
        return parts, dict(scores, lighting_rmse=rmse, shape_residual_cm=fit_resid)

    def close(self) -> None:
        """Release the MediaPipe graphs now (they are also closed at interpreter exit)."""
        self.landmarker.close()
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()
