"""Paper-faithful face backends on user-supplied weights: Deep3DFaceRecon (BFM), BiSeNet, insightface, DECA (FLAME).

Importing this package is light (no torch, cv2 or onnxruntime); the model modules load lazily:
    deep3d.Deep3DFaceRecon     64 BFM expression coefficients (+ pose, SH lighting) from a crop + five points
    bisenet.BiSeNetMask        head mask: every non-background parsing class
    insightface.SCRFDDetector / ArcFaceEmbedder   detection with five points / 512-d identity embeddings
    deca.DecaEncoder + flame.FLAME   DECA codes, the FLAME layer, SH render in the crop frame, re-posing

`preflight(cfg)` checks every file the chosen backends need and raises one `WeightFileMissing` naming all
of them, before any model is loaded (call it in the driver, before launching a job).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rigface.face.backends.weights import WeightFileMissing, WeightFormatError, exists, local_path, weight_ref
from rigface.face.config import FaceConfig

if TYPE_CHECKING:  # pragma: no cover
    from rigface.face.backends.bisenet import BiSeNetMask
    from rigface.face.backends.deep3d import Deep3DFaceRecon
    from rigface.face.backends.insightface import ArcFaceEmbedder, SCRFDDetector

__all__ = [
    "WeightFileMissing",
    "WeightFormatError",
    "required_files",
    "preflight",
    "make_deep3d",
    "make_bisenet",
    "make_scrfd",
    "make_arcface",
    "make_deca",
]


def required_files(cfg: FaceConfig) -> list[tuple[str, str]]:
    """(name as configured, what it is for) for every user-supplied file the chosen backends need."""
    need: list[tuple[str, str]] = []
    if cfg.expression == "deep3d":
        need.append((cfg.deep3d_checkpoint, "Deep3DFaceRecon checkpoint (expression=deep3d)"))
        need.append((cfg.bfm_model, "BFM face model (expression=deep3d)"))
        if cfg.bfm_landmarks:
            need.append((cfg.bfm_landmarks, "BFM 3D landmarks (expression=deep3d)"))
    if cfg.mask == "bisenet":
        need.append((cfg.bisenet_checkpoint, "BiSeNet face-parsing checkpoint (mask=bisenet)"))
    if cfg.detector == "insightface" or cfg.identity == "arcface":
        need.append((cfg.insightface_pack, "insightface model pack folder (detector=insightface / identity=arcface)"))
    if cfg.fit == "deca":
        need.append((cfg.deca_checkpoint, "DECA checkpoint (fit=deca)"))
        need.append((cfg.flame_model, "FLAME 2020 model (fit=deca)"))
        need.append((cfg.flame_albedo, "FLAME texture space FLAME_texture.npz (fit=deca)"))
        need.append((cfg.flame_uv, "FLAME UV layout head_template.obj (fit=deca)"))
        need.append((cfg.flame_landmarks, "FLAME landmark embedding (fit=deca)"))
    return need


def preflight(cfg: FaceConfig) -> list[str]:
    """The resolved refs of every needed file; WeightFileMissing naming each absent one (nothing is loaded)."""
    refs, missing = [], []
    for name, what in required_files(cfg):
        try:
            ref = weight_ref(cfg, name)
        except WeightFileMissing as exc:
            missing.append(f"{what}: {exc}")
            continue
        if exists(ref) or ("://" in ref and _prefix_exists(ref)):
            refs.append(ref)
        else:
            missing.append(f"{what}: not found: {ref}")
    if missing:
        raise WeightFileMissing("missing face-model files:\n  " + "\n  ".join(missing))
    return refs


def _prefix_exists(ref: str) -> bool:
    from rigface.data import storage

    return bool(storage.list_urls(ref.rstrip("/") + "/"))


def _local(cfg: FaceConfig, name: str):
    return local_path(weight_ref(cfg, name))


def make_deep3d(cfg: FaceConfig) -> Deep3DFaceRecon:
    from rigface.face.backends.deep3d import Deep3DFaceRecon

    lm3d = _local(cfg, cfg.bfm_landmarks) if cfg.bfm_landmarks else None
    return Deep3DFaceRecon(_local(cfg, cfg.deep3d_checkpoint), _local(cfg, cfg.bfm_model), lm3d,
                           input_size=cfg.deep3d_input_size, device=cfg.backend_device)


def make_bisenet(cfg: FaceConfig) -> BiSeNetMask:
    from rigface.face.backends.bisenet import BiSeNetMask

    return BiSeNetMask(_local(cfg, cfg.bisenet_checkpoint), cfg.bisenet_input_size, cfg.backend_device)


def make_scrfd(cfg: FaceConfig) -> SCRFDDetector:
    from rigface.face.backends.insightface import SCRFDDetector, pack_files

    files = pack_files(weight_ref(cfg, cfg.insightface_pack), need_recogniser=False)
    return SCRFDDetector(files.detector, det_size=cfg.insightface_det_size, device=cfg.backend_device)


def make_arcface(cfg: FaceConfig) -> ArcFaceEmbedder:
    from rigface.face.backends.insightface import ArcFaceEmbedder, SCRFDDetector, pack_files

    files = pack_files(weight_ref(cfg, cfg.insightface_pack))
    det = SCRFDDetector(files.detector, det_size=cfg.insightface_det_size, device=cfg.backend_device)
    return ArcFaceEmbedder(files.recogniser, detector=det, device=cfg.backend_device)


def make_deca(cfg: FaceConfig):
    from rigface.face.backends.deca import Deca

    return Deca(_local(cfg, cfg.deca_checkpoint), _local(cfg, cfg.flame_model), _local(cfg, cfg.flame_albedo),
                _local(cfg, cfg.flame_uv), _local(cfg, cfg.flame_landmarks), device=cfg.backend_device)
