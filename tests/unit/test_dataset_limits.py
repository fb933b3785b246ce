"""Hostile shards: every reader bounds what a sample may cost before allocating it; a bad sample is a skip."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from rigface.data import dataset, schema
from rigface.data.dataset import Dataset
from shard_media import synthetic_pair

REPO = Path(__file__).resolve().parents[2]


def bomb_png(width: int = 12000, height: int = 12000) -> bytes:
    """A valid grayscale PNG of 144 M zero pixels in ~140 KB: under PIL's own hard limit (2 x 89.5 M pixels, it only
    warns), so unchecked it decodes to 144 MB and 432 MB once converted to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def sparse_member_tar(path: Path, key: str, size: int = 1 << 30) -> None:
    """A tar (GNU sparse format, as `tar -S` writes it) whose one member declares ``size`` bytes."""
    work = path.parent / "sparse-src"
    member = work / f"{key}.source.jpg"
    member.parent.mkdir(parents=True, exist_ok=True)
    with open(member, "wb") as f:
        f.write(b"x")
        f.truncate(size)
    subprocess.run(["tar", "-S", "--format=gnu", "-cf", str(path), "-C", str(work), f"{key}.source.jpg"],
                   check=True)


def write_hostile_dataset(root: Path) -> Dataset:
    ds = Dataset(str(root))
    good = [synthetic_pair("good", i, i + 10) for i in range(2)]
    bomb = synthetic_pair("bomb", 0, 10)
    members = schema.encode_sample(bomb)
    members["render.png"] = bomb_png()
    big_npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(big_npy, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)})
    npy = synthetic_pair("npy", 0, 10)
    npy_members = dict(schema.encode_sample(npy), **{"expression.npy": big_npy.getvalue() + b"\0" * 64})
    ds.write_shard(ds.shard_url("train", 1, 0), [(good[0].key, schema.encode_sample(good[0])),
                                                 (bomb.key, members), (npy.key, npy_members),
                                                 (good[1].key, schema.encode_sample(good[1]))])
    sparse_member_tar(root / "train" / "shard-v001-000001.tar", "sparse/000001-000011")
    (root / "train" / "shard-v001-000001.stats.json").write_text(json.dumps({"samples": 1, "split": "train"}))
    return ds


def test_hostile_samples_are_recorded_skips(tmp_path):
    ds = write_hostile_dataset(tmp_path / "ds")
    assert (tmp_path / "ds" / "train" / "shard-v001-000001.tar").stat().st_size < 64 << 10
    assert len(schema.encode_sample(synthetic_pair("x", 0, 1))["render.png"]) < 8 << 10
    keys = [s.key for s in ds.samples()]
    assert keys == ["good/000000-000010", "good/000001-000011"]
    raw = list(ds.read_shard(ds.shard_url("train", 1, 1)))
    assert len(raw) == 1 and "sparse" in raw[0]["__skip__"]
    report = dataset.validate(str(tmp_path / "ds"))
    text = "\n".join(report.faults)
    assert report.skipped == 1 and "sparse member" in text
    assert "over the limit of" in text and "expression.npy declares shape" in text


_MEASURE = """
import resource, sys
from rigface.data import dataset
from pipelines import train_data as td
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
good = [s.key for s in dataset.iter_samples(sys.argv[1])]
report = dataset.validate(sys.argv[1])
refs = td.list_shards(sys.argv[1])
batches = list(td.epoch_loader(refs, rank=0, world=1, epoch=0, seed=0, batch_size=1, resolution=16,
                               loader_workers=0, shuffle_buffer=0))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(good), report.skipped, len(batches), (after - before) // 1024)
"""


def test_reading_hostile_shards_keeps_memory_bounded(tmp_path):
    write_hostile_dataset(tmp_path / "ds")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "ds")], check=True, capture_output=True,
                         text=True, cwd=REPO, timeout=300).stdout.split()
    good, skipped, batches, growth_mib = map(int, out[-4:])
    assert good == 2 and skipped == 1 and batches == 2
    # Unbounded, the sparse member alone allocates 1 GiB and the PNG 432 MiB (RGB) on top of 144 MiB.
    assert growth_mib < 100, f"peak RSS grew by {growth_mib} MiB"
