"""The shard schema: the ONE place that knows what a training pair looks like on disk.

One WebDataset sample = one training pair. Key ``{video_id}/{frame_a:06d}-{frame_b:06d}`` (made safe for tar
member names: the video id keeps only ``[A-Za-z0-9_-]``, so the first dot of a member name always starts the
extension, as webdataset and ``ray.data.read_webdataset`` expect). Members:

| member            | encoding | content                                                             |
| ----------------- | -------- | ------------------------------------------------------------------- |
| source.jpg        | JPEG     | RGB uint8 HxWx3, square crop (512 by default)                       |
| target.jpg        | JPEG     | RGB uint8, same size as source                                      |
| render.png        | PNG      | RGB uint8, target pose + lighting rendering, pixel-aligned w/ target |
| background.png    | PNG      | RGB uint8, background composite for the edit                        |
| expression.npy    | NPY      | float32 1-D, the target's expression vector                         |
| mask_source.png   | PNG      | L uint8 {0, 255}, head mask of the source crop                      |
| mask_target.png   | PNG      | L uint8 {0, 255}, head mask of the target crop                      |
| meta.json         | JSON     | see ``META_REQUIRED``                                               |

Writers call ``encode_sample`` (or ``pack_sample`` for ready-made tar bytes); readers call ``decode_sample``;
``validate_sample`` checks decoded or raw samples and returns every fault it finds.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1

IMAGE_MEMBERS = ("source.jpg", "target.jpg", "render.png", "background.png")
MASK_MEMBERS = ("mask_source.png", "mask_target.png")
MEMBERS = IMAGE_MEMBERS + ("expression.npy",) + MASK_MEMBERS + ("meta.json",)
# meta.json fields every sample carries (values may be richer than the type named here).
META_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "video_id": str,
    "frames": list,        # [frame_a, frame_b]
    "times": list,         # seconds, [t_a, t_b]
    "split": str,          # "train" | "val"
    "boxes": dict,         # {"source": [x0, y0, x1, y1], "target": [...]} in (possibly downscaled) frame pixels
    "pose": dict,          # {"source": [yaw, pitch, roll], "target": [...]} degrees
    "lighting": dict,      # {"source": [...], "target": [...]} SH coefficients
    "backends": dict,      # names and versions of the face backends
    "scores": dict,        # detection / fit scores
}
SPLITS = ("train", "val")

_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_RE = re.compile(r"^(?P<video>[A-Za-z0-9_-]{1,120})/(?P<a>\d{6,})-(?P<b>\d{6,})$")
# tar members written with a fixed mtime/owner so the same sample always gives the same bytes (reruns compare equal)
_TAR_MTIME = 0


class SchemaError(ValueError):
    """A sample that does not follow the shard schema; the message names the member and the fault."""


def safe_video_id(name: str, content_hash: str | None = None, max_len: int = 80) -> str:
    """A tar-safe video id: ASCII letters, digits, '_' and '-', no dots or slashes.

    Unicode is transliterated where it can be (NFKD), everything else becomes '-'. When a content hash is
    given, its first 10 hex digits are appended so two sources with the same file name stay distinct.
    """
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = _SAFE_ID.sub("-", text).strip("-_")[:max_len] or "video"
    if content_hash:
        slug = f"{slug}-{content_hash[:10]}"
    elif slug != name:
        # The slug lost information: keep ids unique with a short hash of the original name.
        slug = f"{slug}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
    return slug


def sample_key(video_id: str, frame_a: int, frame_b: int) -> str:
    if _SAFE_ID.search(video_id) or not video_id:
        raise SchemaError(f"video id {video_id!r} is not tar-safe: use safe_video_id()")
    if frame_a < 0 or frame_b < 0:
        raise SchemaError(f"negative frame index in pair ({frame_a}, {frame_b})")
    return f"{video_id}/{frame_a:06d}-{frame_b:06d}"


def parse_key(key: str) -> tuple[str, int, int]:
    m = _KEY_RE.match(key)
    if not m:
        raise SchemaError(f"malformed sample key {key!r}")
    return m["video"], int(m["a"]), int(m["b"])


@dataclass
class PairSample:
    """One decoded training pair (arrays in memory, meta as a dict)."""

    key: str
    source: np.ndarray          # HxWx3 uint8 RGB
    target: np.ndarray          # HxWx3 uint8 RGB
    render: np.ndarray          # HxWx3 uint8 RGB
    background: np.ndarray      # HxWx3 uint8 RGB
    expression: np.ndarray      # (D,) float32
    mask_source: np.ndarray     # HxW uint8 {0,255}
    mask_target: np.ndarray     # HxW uint8 {0,255}
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- encoding


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: masks and renders are flat, level 1 is ~4x faster than the default for ~10% more bytes
    Image.fromarray(array).convert(mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def _as_rgb(name: str, array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise SchemaError(f"{name}: dtype {a.dtype}, expected uint8")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise SchemaError(f"{name}: shape {a.shape}, expected HxWx3")
    return np.ascontiguousarray(a)


def _as_mask(name: str, array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise SchemaError(f"{name}: shape {a.shape}, expected HxW")
    if a.dtype == bool or (a.size and float(np.max(a)) <= 1.0):
        a = a.astype(np.float32) * 255.0  # a {0,1} or [0,1] mask
    # Binarise: the mask says "head or not"; soft edges belong to the composite, not the mask.
    return np.where(np.asarray(a) >= 128, 255, 0).astype(np.uint8)


def encode_sample(sample: PairSample, *, jpeg_quality: int = 95) -> dict[str, bytes]:
    """Member name -> bytes, validated first. Raises SchemaError on a bad sample."""
    parse_key(sample.key)
    arrays = {
        "source.jpg": _as_rgb("source", sample.source),
        "target.jpg": _as_rgb("target", sample.target),
        "render.png": _as_rgb("render", sample.render),
        "background.png": _as_rgb("background", sample.background),
    }
    masks = {"mask_source.png": _as_mask("mask_source", sample.mask_source),
             "mask_target.png": _as_mask("mask_target", sample.mask_target)}
    expression = np.asarray(sample.expression, dtype=np.float32).reshape(-1)
    meta = {"schema_version": SCHEMA_VERSION, **sample.meta}
    faults = _check_arrays(arrays, masks, expression) + _check_meta(meta, sample.key)
    if faults:
        raise SchemaError(f"{sample.key}: " + "; ".join(faults))
    out: dict[str, bytes] = {}
    for name, a in arrays.items():
        out[name] = _jpg(a, jpeg_quality) if name.endswith(".jpg") else _png(a, "RGB")
    for name, m in masks.items():
        out[name] = _png(m, "L")
    buf = io.BytesIO()
    np.save(buf, expression, allow_pickle=False)
    out["expression.npy"] = buf.getvalue()
    out["meta.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pack_sample(key: str, members: Mapping[str, bytes]) -> bytes:
    """The tar records of one sample (no end-of-archive marker): shards are these concatenated.

    Deterministic: fixed mtime, owner and mode, members in schema order.
    """
    parse_key(key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in MEMBERS:
            data = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
        end = tar.offset
    return buf.getvalue()[:end]


# ---------------------------------------------------------------- decoding and validation


def split_member_name(name: str) -> tuple[str, str]:
    """'vid/000001-000042.source.jpg' -> ('vid/000001-000042', 'source.jpg'), refusing unsafe names."""
    if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise SchemaError(f"unsafe tar member name {name!r}")
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise SchemaError(f"tar member {name!r} has no extension")
    key = f"{head}/{stem}" if head else stem
    parse_key(key)
    return key, ext


@dataclass(frozen=True)
class DecodeLimits:
    """What one decoded member may cost, checked from its header before any pixel or element is allocated
    (a 20 KB PNG can declare 483 MiB of pixels; an .npy header can declare any shape)."""

    max_image_pixels: int = 4096 * 4096
    max_npy_bytes: int = 1 << 20


def _open_image(key: str, name: str, data: bytes, limits: DecodeLimits, mode: str) -> np.ndarray:
    with warnings.catch_warnings():  # PIL's own bomb warning: the check below is stricter and raises
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))  # reads the header only
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise SchemaError(f"{key}: {name} declares {w}x{h} pixels, over the limit of {limits.max_image_pixels}")
    return np.asarray(im.convert(mode))


def _load_npy(key: str, data: bytes, limits: DecodeLimits) -> np.ndarray:
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)  # the header only, no allocation
    nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if nbytes > limits.max_npy_bytes:
        raise SchemaError(f"{key}: expression.npy declares shape {shape} ({nbytes} bytes), "
                          f"over the limit of {limits.max_npy_bytes}")
    if nbytes > len(data):
        raise SchemaError(f"{key}: expression.npy declares {nbytes} bytes but holds {len(data)}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(raw: Mapping[str, Any], limits: DecodeLimits | None = None) -> PairSample:
    """A raw webdataset dict (``__key__`` plus member bytes, with or without leading dots) -> PairSample.
    Images and the expression array are checked against ``limits`` before they are decoded."""
    limits = limits or DecodeLimits()
    members = {k.lstrip("."): v for k, v in raw.items() if not k.startswith("__")}
    key = raw.get("__key__")
    if not isinstance(key, str):
        raise SchemaError("sample without a __key__")
    parse_key(key)
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SchemaError(f"{key}: missing members {missing}")
    try:
        imgs = {m: _open_image(key, m, members[m], limits, "RGB") for m in IMAGE_MEMBERS}
        masks = {m: _open_image(key, m, members[m], limits, "L") for m in MASK_MEMBERS}
        expression = _load_npy(key, members["expression.npy"], limits)
        meta = json.loads(members["meta.json"])
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a schema fault of this sample
        raise SchemaError(f"{key}: cannot decode: {exc}") from exc
    if not isinstance(meta, dict):
        raise SchemaError(f"{key}: meta.json is not an object")
    return PairSample(
        key=key,
        source=imgs["source.jpg"], target=imgs["target.jpg"], render=imgs["render.png"],
        background=imgs["background.png"], expression=expression,
        mask_source=masks["mask_source.png"], mask_target=masks["mask_target.png"], meta=meta,
    )


def _check_arrays(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], expression: np.ndarray) -> list[str]:
    faults = []
    shape = arrays["source.jpg"].shape
    if shape[0] != shape[1] or shape[0] < 16:
        faults.append(f"source.jpg: {shape[:2]} is not a square crop")
    for name, a in arrays.items():
        if a.shape != shape:
            faults.append(f"{name}: shape {a.shape} != source {shape}")
    for name, m in masks.items():
        if m.shape != shape[:2]:
            faults.append(f"{name}: shape {m.shape} != crop {shape[:2]}")
    if expression.dtype != np.float32 or expression.ndim != 1 or expression.size == 0:
        faults.append(f"expression.npy: {expression.dtype} {expression.shape}, expected non-empty float32 vector")
    elif not np.all(np.isfinite(expression)):
        faults.append("expression.npy: non-finite values")
    return faults


def _check_meta(meta: Mapping[str, Any], key: str) -> list[str]:
    faults = []
    for name, kind in META_REQUIRED.items():
        if name not in meta:
            faults.append(f"meta.json: missing {name!r}")
        elif not isinstance(meta[name], kind):
            faults.append(f"meta.json: {name!r} is {type(meta[name]).__name__}")
    if faults:
        return faults
    if meta["schema_version"] != SCHEMA_VERSION:
        faults.append(f"meta.json: schema_version {meta['schema_version']} != {SCHEMA_VERSION}")
    if meta["split"] not in SPLITS:
        faults.append(f"meta.json: split {meta['split']!r} not in {SPLITS}")
    try:
        video, a, b = parse_key(key)
    except SchemaError as exc:
        return faults + [str(exc)]
    if meta["video_id"] != video or list(meta["frames"]) != [a, b]:
        faults.append(f"meta.json: video/frames {meta['video_id']}/{meta['frames']} disagree with key {key}")
    if len(meta["times"]) != 2:
        faults.append("meta.json: times must hold two values")
    return faults


def validate_sample(sample: PairSample | Mapping[str, Any], limits: DecodeLimits | None = None) -> list[str]:
    """Every schema fault of one sample (decoded or raw); an empty list means valid."""
    if not isinstance(sample, PairSample):
        try:
            sample = decode_sample(sample, limits)
        except SchemaError as exc:
            return [str(exc)]
    arrays = {"source.jpg": sample.source, "target.jpg": sample.target, "render.png": sample.render,
              "background.png": sample.background}
    faults = []
    for name, a in arrays.items():
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            faults.append(f"{name}: {a.dtype} {a.shape}, expected HxWx3 uint8")
    if faults:
        return faults
    masks = {"mask_source.png": sample.mask_source, "mask_target.png": sample.mask_target}
    for name, m in masks.items():
        if m.dtype != np.uint8 or not np.isin(m, (0, 255)).all():
            faults.append(f"{name}: expected a binary uint8 mask")
    faults += _check_arrays(arrays, masks, np.asarray(sample.expression))
    faults += _check_meta(sample.meta, sample.key)
    return faults
