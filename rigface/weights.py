"""`rigface weights check ROOT`: which of the paper's weight files a folder (or s3:// prefix) holds, in what shape.

Looks for every file the paper's setup needs (SD-1.5 folder, the released UNets, DECA + FLAME + texture + UV +
landmark embedding, BFM, both Deep3DFaceRecon variants, BiSeNet, insightface antelopev2), anywhere under ROOT
(by file name, so the authors' own layouts such as `checkpoints/third_party/...` are found too). For each: its
format, and its key names and shapes checked against the loader's model definition, read from headers where the
format allows (safetensors headers, the pickle inside torch zip checkpoints, .npy headers inside .npz, .mat
variable headers), so on S3 only a few ranged reads are made instead of downloading gigabytes. Then it says
which job can run with what was found. Nothing is executed from the files (allow-list unpicklers only).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable

from rigface.data import storage

# -- reading parts of local or S3 files -----------------------------------------------------------------------


class RangeFile(io.RawIOBase):
    """A seekable read-only file over storage.read_range (S3) or a local path, with a small block cache."""

    BLOCK = 1 << 18

    def __init__(self, url: str):
        self.url, self.pos, self.length = url, 0, storage.size(url)
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def _block(self, i: int) -> bytes:
        if i not in self._blocks:
            if len(self._blocks) > 64:
                self._blocks.clear()
            start = i * self.BLOCK
            self._blocks[i] = storage.read_range(self.url, start, min(self.BLOCK, self.length - start))
        return self._blocks[i]

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = bytearray()
        while self.pos < end:
            i, off = divmod(self.pos, self.BLOCK)
            chunk = self._block(i)[off : off + (end - self.pos)]
            if not chunk:
                break
            out += chunk
            self.pos += len(chunk)
        return bytes(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Meta:
    """Stands in for a tensor or storage while reading a checkpoint's pickle: keeps the shape, no data."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.shape = tuple(int(v) for v in shape)


def _rebuild_tensor(storage_, offset, size, *args):
    return _Meta(size)


def _rebuild_parameter(data, *args):
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """torch's data.pkl with tensors as shapes only: an allow-list, nothing from the file runs."""

    _FUNCS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
              ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def find_class(self, module: str, name: str):
        if (module, name) in self._FUNCS:
            return self._FUNCS[(module, name)]
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _Meta
        if (module, name) in (("torch", "Size"), ("builtins", "tuple")):
            return tuple
        if module.startswith("numpy") and name in ("dtype", "_reconstruct", "ndarray", "scalar"):
            return _Meta
        raise pickle.UnpicklingError(f"refusing {module}.{name}")

    def persistent_load(self, pid):
        return _Meta()


def torch_shapes(url: str) -> Any:
    """The object of a torch checkpoint with every tensor replaced by its shape (_Meta).

    Zip checkpoints (torch >= 1.6): only the pickle is read. Legacy ones: loaded (weights_only) from a local copy.
    """
    with RangeFile(url) as raw:
        is_zip = zipfile.is_zipfile(raw)
    if not is_zip:
        from rigface.face.backends.weights import load_torch_checkpoint, local_path

        def meta(obj):
            if isinstance(obj, dict):
                return {k: meta(v) for k, v in obj.items()}
            return _Meta(obj.shape) if hasattr(obj, "shape") else obj

        return meta(load_torch_checkpoint(local_path(url)))
    with RangeFile(url) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 16)) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError("a zip without data.pkl: not a torch checkpoint")
        return _ShapeUnpickler(io.BytesIO(zf.read(pkl)), encoding="latin1").load()


def _flat_shapes(obj: Any) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a state dict, DataParallel's `module.` prefix removed (as the loaders do)."""
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    shapes = {k: v.shape for k, v in obj.items() if isinstance(v, _Meta)}
    if shapes and all(k.startswith("module.") for k in shapes):
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    return shapes


def safetensors_shapes(url: str) -> dict[str, tuple[int, ...]]:
    head = storage.read_range(url, 0, 8)
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise ValueError(f"safetensors header of {n} bytes: not a safetensors file")
    meta = json.loads(storage.read_range(url, 8, n))
    return {k: tuple(v["shape"]) for k, v in meta.items() if k != "__metadata__"}


def npz_shapes(url: str) -> dict[str, tuple[int, ...]]:
    from numpy.lib import format as npformat

    out = {}
    with RangeFile(url) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 16)) as zf:
        for name in zf.namelist():
            with zf.open(name) as fh:
                major, _ = npformat.read_magic(fh)
                read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
                out[name.removesuffix(".npy")] = tuple(read(fh)[0])
    return out


def compare_shapes(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Problems of `found` against a model's state-dict shapes (num_batches_tracked optional)."""
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    out = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            out.append(f"{len(items)} {label}: " + ", ".join(items[:4]) + (" ..." if len(items) > 4 else ""))
    return out


def _state_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# -- the files ------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One expected file or folder: where it was found, its format, what its keys/shapes say."""

    name: str
    what: str
    path: str | None = None
    format: str = ""
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    config: str = ""  # the --set that points the config at it, when not at the default place

    @property
    def present(self) -> bool:
        return self.path is not None

    @property
    def ok(self) -> bool:
        return self.present and not self.problems

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("missing" if not self.present else "bad")


class Listing:
    """Every file under ROOT, with lookup by file name and by folder name."""

    def __init__(self, root: str):
        import os

        self.root = root.rstrip("/") if "://" in root else os.path.abspath(os.path.expanduser(root))
        self.urls = storage.list_urls(self.root)

    def rel(self, url: str) -> str:
        return url[len(self.root):].lstrip("/")

    def by_name(self, name: str) -> list[str]:
        return sorted((u for u in self.urls if PurePosixPath(self.rel(u)).name == name), key=lambda u: (u.count("/"), u))

    def under(self, folder_url: str) -> list[str]:
        prefix = folder_url.rstrip("/") + "/"
        return [u for u in self.urls if u.startswith(prefix)]

    def folders_named(self, name: str) -> list[str]:
        found = set()
        for u in self.urls:
            parts = PurePosixPath(self.rel(u)).parts
            for i, p in enumerate(parts[:-1]):
                if p == name:
                    found.add(self.root + "/" + "/".join(parts[: i + 1]))
        return sorted(found, key=lambda f: (f.count("/"), f))


def _check(item: Item, fn: Callable[[], str]) -> None:
    try:
        item.detail = fn()
    except Exception as exc:  # noqa: BLE001 - an unreadable file is reported, not a crash of the check
        item.problems.append(f"{type(exc).__name__}: {exc}"[:300])


def _find_file(listing: Listing, item: Item, default_rel: str, config_key: str) -> str | None:
    urls = listing.by_name(PurePosixPath(default_rel).name)
    if not urls:
        return None
    item.path = urls[0]
    rel = listing.rel(urls[0])
    if rel != default_rel:
        item.config = f"face.{config_key}={rel}"
    return urls[0]


def check_sd15(listing: Listing) -> Item:
    item = Item("sd15", "Stable Diffusion 1.5 folder (unet, vae, text_encoder, tokenizer, scheduler)")
    configs = [u for u in listing.by_name("config.json") if PurePosixPath(listing.rel(u)).parent.name == "unet"]
    configs = [u for u in configs if "unet_denoise" not in u and "unet_id" not in u]
    if not configs:
        return item
    folder = configs[0].rsplit("/", 2)[0]
    item.path, item.format = folder, "diffusers folder"
    item.config = f"model.pretrained={folder}"

    def inspect() -> str:
        have = {listing.rel(u)[len(listing.rel(folder)):].lstrip("/").split("/")[0] for u in listing.under(folder)}
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if s not in have]
        if missing:
            item.problems.append("missing subfolders: " + ", ".join(missing))
        cfg = json.loads(storage.read_text(configs[0]))
        want = {"in_channels": 4, "cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}
        for k, v in want.items():
            if cfg.get(k) != v:
                item.problems.append(f"unet/config.json {k}={cfg.get(k)!r}, SD-1.5 has {v!r}")
        weights = [u for u in listing.under(folder + "/unet") if u.endswith(".safetensors")]
        if not weights:
            return "unet: no .safetensors (a .bin-only UNet is not checked)"
        shapes: dict[str, tuple] = {}
        for w in weights:
            shapes.update(safetensors_shapes(w))
        if shapes.get("conv_in.weight") != (320, 4, 3, 3):
            item.problems.append(f"unet conv_in.weight {shapes.get('conv_in.weight')}, SD-1.5 has (320, 4, 3, 3)")
        return f"unet: {len(shapes)} tensors (safetensors), conv_in {shapes.get('conv_in.weight')}"

    _check(item, inspect)
    return item


def _newest_checkpoint(listing: Listing, part_folder: str) -> str:
    """The part folder itself, or its newest checkpoint-N subfolder (the release nests checkpoint-70000)."""
    nested = {}
    for u in listing.under(part_folder):
        first = listing.rel(u)[len(listing.rel(part_folder)):].lstrip("/").split("/")[0]
        if first.startswith("checkpoint-") and first[len("checkpoint-"):].isdigit():
            nested[int(first[len("checkpoint-"):])] = f"{part_folder}/{first}"
    return nested[max(nested)] if nested else part_folder


def check_released(listing: Listing) -> list[Item]:
    items = []
    want_conv_in = {"unet_denoise": (320, 12, 3, 3), "unet_id": (320, 4, 3, 3)}
    for part in ("unet_denoise", "unet_id"):
        item = Item(part, f"released RigFace {part} (safetensors, diffusers-0.22 names"
                    + (" + au_aug_mlp)" if part == "unet_denoise" else ")"))
        folders = listing.folders_named(part)
        if folders:
            folder = _newest_checkpoint(listing, folders[0])
            files = [u for u in listing.under(folder) if u.endswith(".safetensors")]
            item.path, item.format = folder, "safetensors" if files else "no .safetensors"
            item.config = f"model.released={folders[0].rsplit('/', 1)[0]}"

            def inspect(files=files, item=item, part=part) -> str:
                if not files:
                    item.problems.append("no .safetensors file")
                    return ""
                shapes: dict[str, tuple] = {}
                for f in files:
                    shapes.update(safetensors_shapes(f))
                conv = shapes.get("conv_in.weight")
                if conv != want_conv_in[part]:
                    item.problems.append(f"conv_in.weight {conv}, the release has {want_conv_in[part]}")
                mlp = shapes.get("au_aug_mlp.weight")
                if part == "unet_denoise" and mlp != (1280, 64):
                    item.problems.append(f"au_aug_mlp.weight {mlp}, the release has (1280, 64)")
                if part == "unet_id" and mlp is not None:
                    item.problems.append("au_aug_mlp.* in unet_id (it lives in unet_denoise)")
                return f"{len(shapes)} tensors, conv_in {conv}" + (f", au_aug_mlp {mlp}" if mlp else "")

            _check(item, inspect)
        items.append(item)
    return items


def check_deep3d(listing: Listing) -> list[Item]:
    from rigface.face.backends.deep3d import FACE_ADAPTER, ORIGINAL, ReconNet, variant_of

    items = []
    for file, variant, what in (("d3dfr_res50_nofc.pth", FACE_ADAPTER, "Deep3DFaceRecon, Face-Adapter's (the authors')"),
                                ("epoch_20.pth", ORIGINAL, "Deep3DFaceRecon, original epoch_20")):
        item = Item(f"deep3d:{variant.name}", what)
        url = _find_file(listing, item, file, "deep3d_checkpoint")
        if url:
            item.format = "torch checkpoint"

            def inspect(url=url, item=item, variant=variant) -> str:
                obj = torch_shapes(url)
                if isinstance(obj, dict) and isinstance(obj.get("net_recon"), dict):
                    obj = obj["net_recon"]
                shapes = _flat_shapes(obj)
                found = variant_of(shapes, item.path)
                if found.name != variant.name:
                    item.problems.append(f"holds the {found.name} layout, not {variant.name}")
                item.problems += compare_shapes(_state_shapes(ReconNet(found)), shapes)
                heads = [shapes.get(f"{found.head_attr}.{i}.bias", ("?",))[0] for i in range(len(found.heads))]
                return f"{found.name}: {len(shapes)} tensors, {found.head_attr} heads {heads}"

            _check(item, inspect)
        items.append(item)
    return items


def check_bfm(listing: Listing) -> Item:
    item = Item("bfm", "BFM_model_front.mat (Deep3DFaceRecon's face model)")
    url = _find_file(listing, item, "BFM_model_front.mat", "bfm_model")
    if url:
        item.format = "MATLAB .mat"

        def inspect() -> str:
            from scipy.io import whosmat

            with RangeFile(url) as raw:
                found = {name: shape for name, shape, _ in whosmat(io.BufferedReader(raw, 1 << 16))}
            need = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "keypoints")
            miss = [k for k in need if k not in found]
            if miss:
                item.problems.append("missing " + ", ".join(miss))
                return ""
            n3 = max(found["meanshape"])
            for k, cols in (("idBase", 80), ("exBase", 64), ("texBase", 80)):
                if tuple(found[k]) != (n3, cols):
                    item.problems.append(f"{k} {found[k]}, expected ({n3}, {cols})")
            return f"{n3 // 3} vertices; idBase {found['idBase']}, exBase {found['exBase']}, tri {found['tri']}"

        _check(item, inspect)
    return item


def check_bisenet(listing: Listing) -> Item:
    from rigface.face.backends.bisenet import BiSeNet

    item = Item("bisenet", "BiSeNet face parsing 79999_iter.pth")
    url = _find_file(listing, item, "79999_iter.pth", "bisenet_checkpoint")
    if url:
        item.format = "torch checkpoint"

        def inspect() -> str:
            shapes = _flat_shapes(torch_shapes(url))
            item.problems += compare_shapes(_state_shapes(BiSeNet()), shapes)
            return f"{len(shapes)} tensors, classes {shapes.get('conv_out.conv_out.weight', ('?',))[0]}"

        _check(item, inspect)
    return item


def check_deca(listing: Listing) -> list[Item]:
    from rigface.face.backends.deca import DecaEncoder

    out = []
    deca = Item("deca", "DECA deca_model.tar (E_flame used)")
    url = _find_file(listing, deca, "deca_model.tar", "deca_checkpoint")
    if url:
        deca.format = "torch checkpoint"

        def inspect_deca() -> str:
            obj = torch_shapes(url)
            if not isinstance(obj, dict) or "E_flame" not in obj:
                raise ValueError("no 'E_flame' entry")
            shapes = _flat_shapes(obj["E_flame"])
            deca.problems += compare_shapes(_state_shapes(DecaEncoder()), shapes)
            return f"E_flame {len(shapes)} tensors, codes {shapes.get('layers.2.weight', ('?',))[0]}; " \
                   f"entries {sorted(obj)}"

        _check(deca, inspect_deca)
    out.append(deca)

    from rigface.face.backends import flame as flame_mod

    def local_check(item: Item, url: str, fn) -> None:
        def run() -> str:
            from rigface.face.backends.weights import local_path

            return fn(local_path(url))

        _check(item, run)

    flame = Item("flame", "FLAME 2020 generic_model.pkl")
    url = _find_file(listing, flame, "generic_model.pkl", "flame_model")
    if url:
        flame.format = "pickle (chumpy arrays)"
        local_check(flame, url, lambda p: (lambda m: f"{m['v_template'].shape[0]} vertices, {m['f'].shape[0]} faces, "
                                                     f"shapedirs {m['shapedirs'].shape}")(flame_mod.load_flame_pickle(p)))
    out.append(flame)

    tex = Item("texture", "FLAME texture space FLAME_texture.npz")
    url = _find_file(listing, tex, "FLAME_texture.npz", "flame_albedo")
    if url:
        tex.format = "npz"

        def inspect_tex() -> str:
            shapes = npz_shapes(url)
            mean, dirs = shapes.get("mean"), shapes.get("tex_dir")
            if mean is None or dirs is None:
                tex.problems.append(f"needs mean and tex_dir; has {sorted(shapes)}")
            elif len(dirs) != 4 or dirs[:3] != mean or dirs[3] < 50:
                tex.problems.append(f"tex_dir {dirs} does not fit mean {mean} with >= 50 directions")
            return f"mean {mean}, tex_dir {dirs}"

        _check(tex, inspect_tex)
    out.append(tex)

    uv = Item("uv", "FLAME UV layout head_template.obj")
    url = _find_file(listing, uv, "head_template.obj", "flame_uv")
    if url:
        uv.format = "Wavefront OBJ"
        local_check(uv, url, lambda p: (lambda t: f"{t.n_vertices} vertices, {len(t.uvs)} uvs, {len(t.faces)} faces")(
            flame_mod.load_head_template(p)))
    out.append(uv)

    lmk = Item("landmarks", "FLAME landmark_embedding.npy")
    url = _find_file(listing, lmk, "landmark_embedding.npy", "flame_landmarks")
    if url:
        lmk.format = "npy (pickled dict)"
        local_check(lmk, url, lambda p: (lambda fb: f"static landmarks {fb[0].shape}, barycentrics {fb[1].shape}")(
            flame_mod.load_landmark_embedding(p)))
    out.append(lmk)
    return out


def check_antelopev2(listing: Listing) -> Item:
    item = Item("antelopev2", "insightface antelopev2 (SCRFD detector + ArcFace glintr100)")
    folders = listing.folders_named("antelopev2")
    if not folders:
        return item
    item.path, item.format = folders[0], "ONNX folder"
    if listing.rel(folders[0]) != "antelopev2":
        item.config = f"face.insightface_pack={listing.rel(folders[0])}"

    def inspect() -> str:
        from rigface.face.backends.insightface import pack_files

        files = pack_files(folders[0])
        import onnxruntime as ort

        desc = []
        for role, path in (("detector", files.detector), ("recogniser", files.recogniser)):
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            desc.append(f"{role} {path.name}: in {sess.get_inputs()[0].shape}, {len(sess.get_outputs())} outputs")
        return "; ".join(desc)

    _check(item, inspect)
    return item


# -- the report -------------------------------------------------------------------------------------------------

JOBS = {
    "prepare (paper backends)": ["antelopev2", "deca", "flame", "texture", "uv", "landmarks", "deep3d", "bfm", "bisenet"],
    "train": ["sd15"],
    "train from the release": ["sd15", "unet_denoise", "unet_id"],
    "edit (released model, paper backends)": ["sd15", "unet_denoise", "unet_id", "antelopev2", "deca", "flame",
                                              "texture", "uv", "landmarks", "deep3d", "bfm", "bisenet"],
    "evaluate (+ ArcFace identity)": ["sd15", "unet_denoise", "unet_id", "antelopev2", "deca", "flame", "texture", "uv",
                                      "landmarks", "deep3d", "bfm", "bisenet"],
}


@dataclass
class WeightsReport:
    root: str
    items: list[Item]
    jobs: dict[str, list[str]]  # job -> what it lacks (empty: ready)
    overrides: list[str]

    @property
    def ok(self) -> bool:
        """No file that is there is broken (missing files are reported, not errors)."""
        return not any(i.present and i.problems for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok,
                "items": [dict(asdict(i), status=i.status) for i in self.items],
                "jobs": {job: {"ready": not lacks, "lacks": lacks} for job, lacks in self.jobs.items()},
                "overrides": self.overrides}


def check_weights(root: str) -> WeightsReport:
    listing = Listing(root)
    items = [check_sd15(listing), *check_released(listing), *check_deca(listing), check_bfm(listing),
             *check_deep3d(listing), check_bisenet(listing), check_antelopev2(listing)]
    ok = {i.name for i in items if i.ok}
    ok |= {"deep3d"} if {"deep3d:face_adapter", "deep3d:deep3d"} & ok else set()
    jobs = {job: [n for n in need if n not in ok] for job, need in JOBS.items()}
    overrides = [i.config for i in items if i.ok and i.config and i.name != "deep3d:deep3d"]
    if "deep3d:face_adapter" not in ok and "deep3d:deep3d" in ok:  # only the original variant: name it
        overrides.append("face.deep3d_checkpoint=" + next(listing.rel(i.path) for i in items if i.name == "deep3d:deep3d"))
    if any(i.ok and i.name not in ("sd15", "unet_denoise", "unet_id") for i in items):
        overrides.insert(0, f"face.weights={listing.root}")
    return WeightsReport(listing.root, items, jobs, list(dict.fromkeys(overrides)))
