"""Video decoding (decord) on good and bad files, and video sources (folder, manifests)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rigface.data import sources
from rigface.data.video import Video, VideoError, probe, scaled_size

import media


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    good = media.face_video(d / "good.mp4", n_frames=20, fps=10, size=128)
    return {"good": good, **media.bad_inputs(d / "bad", good)}


def test_reads_selected_frames(clips):
    with Video(clips["good"]) as v:
        assert (v.info.n_frames, v.info.fps, v.info.height, v.info.width) == (20, 10.0, 128, 128)
        frames = v.read([0, 7, 19])
        assert frames.shape == (3, 128, 128, 3) and frames.dtype == np.uint8
        # Frames differ (the face drifts), and reading again gives the same pixels.
        assert np.abs(frames[0].astype(int) - frames[1]).mean() > 0.5
        np.testing.assert_array_equal(v.read([7])[0], frames[1])
        with pytest.raises(VideoError, match="out of range"):
            v.read([20])


@pytest.mark.parametrize("name,reason", [("zero", "empty"), ("text", "unreadable"), ("truncated", "unreadable"),
                                         ("corrupt", "unreadable"), ("audio", "no_video_stream")])
def test_bad_files_raise_typed_errors(clips, name, reason):
    with pytest.raises(VideoError) as err:
        Video(clips[name]).read([0])
    assert err.value.reason == reason


def test_missing_file(tmp_path):
    with pytest.raises(VideoError):
        Video(tmp_path / "nope.mp4")


def test_huge_frames_are_downscaled(tmp_path):
    big = media.write_video(tmp_path / "big.mp4", [np.full((1080, 1920, 3), i * 40, np.uint8) for i in range(3)])
    info = probe(big, max_side=480)
    assert (info.orig_height, info.orig_width) == (1080, 1920)
    assert max(info.height, info.width) <= 480 and info.downscaled
    with Video(big, max_side=480) as v:
        assert v.read([2]).shape == (1, info.height, info.width, 3)
    assert scaled_size(100, 50, 4096) == (100, 50)


def test_grayscale_video_decodes_to_rgb(tmp_path):
    path = media.face_video(tmp_path / "gray.mkv", n_frames=4, size=64, gray=True, codec="ffv1")
    with Video(path) as v:
        f = v.read([1])[0]
    assert f.shape == (64, 64, 3)
    assert np.array_equal(f[..., 0], f[..., 1])


def test_folder_source_with_spaces_and_unicode(tmp_path):
    media.face_video(tmp_path / "src" / "séance été" / "clip one.mp4", n_frames=3, size=32)
    media.face_video(tmp_path / "src" / "b.webm", n_frames=3, size=32, codec="libvpx")
    (tmp_path / "src" / "notes.txt").write_text("x")
    refs = sources.list_videos(str(tmp_path / "src"))
    assert [r.name for r in refs] == ["b.webm", "séance été/clip one.mp4"]
    digest = sources.content_hash(refs[1].url)
    vid = sources.derive_video_id(refs[1], digest)
    assert vid.startswith("seance-ete-clip-one-") and "." not in vid
    with sources.local_copy(refs[1].url) as p, Video(p) as v:
        assert v.info.n_frames == 3


def test_manifests(tmp_path):
    media.face_video(tmp_path / "v" / "a.mp4", n_frames=3, size=32)
    rows = [{"path": "v/a.mp4", "video_id": "subject 1", "split": "val"}, {"path": str(tmp_path / "v" / "a.mp4")}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "m.csv").write_text("path,split\nv/a.mp4,train\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"path": "v/a.mp4"}]), tmp_path / "m.parquet")
    jl = sources.list_videos(str(tmp_path / "m.jsonl"))
    ids = sorted((r.video_id or "") for r in jl)
    assert ids[0] == "" and ids[1].startswith("subject-1-") and " " not in ids[1]
    assert {r.split for r in jl} == {"val", None}
    assert all(r.url == str(tmp_path / "v" / "a.mp4") for r in jl)
    assert sources.list_videos(str(tmp_path / "m.csv"))[0].split == "train"
    assert sources.list_videos(str(tmp_path / "m.parquet"))[0].url == str(tmp_path / "v" / "a.mp4")
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(sources.SourceError, match="path"):
        sources.list_videos(str(tmp_path / "bad.csv"))
    with pytest.raises(sources.SourceError):
        sources.list_videos(str(tmp_path / "empty-dir-that-is-missing"))


def test_split_is_by_video_and_stable():
    splits = [sources.assign_split(f"{i:064x}", 0.3) for i in range(400)]
    assert 0.2 < splits.count("val") / 400 < 0.4
    assert splits == [sources.assign_split(f"{i:064x}", 0.3) for i in range(400)]
    assert sources.assign_split("ab", 0.0) == "train"


def test_sampled_content_hash_is_stable_and_sees_changed_content(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, 3 * (1 << 20) + 123, dtype=np.uint8).tobytes()
    a = tmp_path / "a.mp4"
    a.write_bytes(big)
    h = sources.content_hash(str(a))
    assert h == sources.content_hash(str(a)) == sources.content_hash(str(a), size=len(big))
    (tmp_path / "copy.mp4").write_bytes(big)
    assert sources.content_hash(str(tmp_path / "copy.mp4")) == h  # identity is content, not the name
    # Changed bytes inside a sampled window (first, last, middle), or another size: another identity.
    n = len(big)
    step = (n - sources.HASH_WINDOW) / (sources.HASH_SAMPLES - 1)
    for pos in (0, n - 1, round(3 * step) + 10):
        b = bytearray(big)
        b[pos] ^= 0xFF
        (tmp_path / "x.mp4").write_bytes(bytes(b))
        assert sources.content_hash(str(tmp_path / "x.mp4")) != h, pos
    (tmp_path / "y.mp4").write_bytes(big + b"\0")
    assert sources.content_hash(str(tmp_path / "y.mp4")) != h
    # A change between windows keeps the sampled identity: that is what full_content_hash is for.
    b = bytearray(big)
    b[round(0.5 * step)] ^= 0xFF
    (tmp_path / "z.mp4").write_bytes(bytes(b))
    assert sources.content_hash(str(tmp_path / "z.mp4")) == h
    assert sources.full_content_hash(str(tmp_path / "z.mp4")) != sources.full_content_hash(str(a))
    # Small files are read whole: any change shows.
    small = bytearray(big[:1000])
    (tmp_path / "s1.mp4").write_bytes(bytes(small))
    small[500] ^= 0xFF
    (tmp_path / "s2.mp4").write_bytes(bytes(small))
    assert sources.content_hash(str(tmp_path / "s1.mp4")) != sources.content_hash(str(tmp_path / "s2.mp4"))
