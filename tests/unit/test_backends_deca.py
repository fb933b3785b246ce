"""FLAME layer (exact cases), the chumpy-free FLAME pickle reader and DECA's encoder checkpoint."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest

import torch

from rigface.face.backends import WeightFormatError  # noqa: E402
from rigface.face.backends.flame import FLAME, load_flame_pickle  # noqa: E402

N = 60
JAW = np.arange(40, N)  # vertices driven by the jaw joint


def _flame_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    weights = np.zeros((N, 5))
    weights[:20, 0] = 1.0
    weights[20:40, 1] = 1.0  # neck
    weights[40:50, 2] = 1.0  # jaw
    weights[50:, 2] = 0.5
    weights[50:, 1] = 0.5
    posedirs = rng.normal(0, 1e-2, (N, 3, 36))
    posedirs[:40, :, 9:18] = 0.0  # jaw correctives touch only jaw vertices, as in FLAME
    jreg = np.zeros((5, N))
    for j, rows in enumerate((range(0, 20), range(20, 40), range(40, 50), range(0, 5), range(5, 10))):
        jreg[j, list(rows)] = 1.0 / len(rows)
    import scipy.sparse

    return {
        "v_template": rng.normal(0, 0.1, (N, 3)),
        "shapedirs": rng.normal(0, 1e-3, (N, 3, 400)),
        "posedirs": posedirs,
        "J_regressor": scipy.sparse.csc_matrix(jreg),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "f": rng.integers(0, N, (80, 3)).astype(np.uint32),
        "bs_style": "lbs",
    }


def _write_chumpy_pickle(arrays: dict, path) -> None:
    """A FLAME2020-like pickle: arrays wrapped in chumpy.ch.Ch objects (a fake chumpy, removed afterwards)."""
    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:
        pass

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch = Ch
    pkg = types.ModuleType("chumpy")
    pkg.ch = ch_mod
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, ch_mod
    try:
        out = {}
        for k, v in arrays.items():
            if k in ("v_template", "shapedirs", "posedirs", "weights"):
                obj = Ch()
                obj.__dict__.update({"x": v, "_dirty_vars": set(), "_itr": None})
                out[k] = obj
            else:
                out[k] = v
        with open(path, "wb") as fh:
            pickle.dump(out, fh, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


@pytest.fixture(scope="module")
def flame_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    arrays = _flame_arrays()
    _write_chumpy_pickle(arrays, path)
    return path, arrays


def test_flame_pickle_reads_without_chumpy(flame_pkl):
    path, arrays = flame_pkl
    assert "chumpy" not in sys.modules
    model = load_flame_pickle(path)
    assert "chumpy" not in sys.modules
    np.testing.assert_array_equal(model["v_template"], arrays["v_template"])
    np.testing.assert_array_equal(model["J_regressor"], arrays["J_regressor"].toarray())
    assert model["shapedirs"].shape == (N, 3, 400) and model["weights"].shape == (N, 5)


def test_flame_pickle_refuses_code_and_wrong_shapes(flame_pkl, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    # (Ray may have swapped builtins.print for its own in this process, so the refused name varies.)
    with pytest.raises(WeightFormatError, match=r"refusing to load .*print"):
        load_flame_pickle(tmp_path / "evil.pkl")

    class EvilNumpy:  # a numpy callable that executes a string: module prefixes alone would let it through
        def __reduce__(self):
            from numpy.testing._private.utils import runstring

            return (runstring, ("import os", {}))

    (tmp_path / "evil_np.pkl").write_bytes(pickle.dumps({"v_template": EvilNumpy()}, protocol=2))
    with pytest.raises(WeightFormatError, match=r"refusing to load numpy\.testing"):
        load_flame_pickle(tmp_path / "evil_np.pkl")
    arrays = _flame_arrays()
    arrays["weights"] = arrays["weights"][:, :4]
    _write_chumpy_pickle(arrays, tmp_path / "bad.pkl")
    with pytest.raises(WeightFormatError, match=r"weights \(60, 4\)"):
        load_flame_pickle(tmp_path / "bad.pkl")


@pytest.fixture(scope="module")
def flame(flame_pkl):
    return FLAME(load_flame_pickle(flame_pkl[0]))


def _run(flame, shape=None, exp=None, pose=None):
    z = torch.zeros
    return flame(z(1, 100) if shape is None else shape, z(1, 50) if exp is None else exp,
                 z(1, 6) if pose is None else pose)[0].double().numpy()


def test_flame_zero_pose_gives_the_template(flame, flame_pkl):
    arrays = flame_pkl[1]
    np.testing.assert_allclose(_run(flame), arrays["v_template"], atol=1e-6)
    shape = torch.randn(1, 100)
    exp = torch.randn(1, 50)
    dirs = np.concatenate([arrays["shapedirs"][:, :, :100], arrays["shapedirs"][:, :, 300:350]], 2)
    expected = arrays["v_template"] + dirs @ np.concatenate([shape[0].numpy(), exp[0].numpy()])
    np.testing.assert_allclose(_run(flame, shape, exp), expected, atol=1e-5)


def test_flame_jaw_rotation_moves_only_jaw_vertices(flame):
    rest = _run(flame)
    opened = _run(flame, pose=torch.tensor([[0.0, 0.0, 0.0, 0.3, 0.0, 0.0]]))
    moved = np.linalg.norm(opened - rest, axis=1) > 1e-6
    np.testing.assert_array_equal(np.flatnonzero(moved), JAW)


def test_flame_global_rotation_is_rigid_about_the_root_joint(flame, flame_pkl):
    arrays = flame_pkl[1]
    rest = _run(flame)
    turned = _run(flame, pose=torch.tensor([[0.0, np.pi / 2, 0.0, 0.0, 0.0, 0.0]]))
    root = arrays["J_regressor"].toarray()[0] @ arrays["v_template"]
    rot = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # +90 degrees about y
    np.testing.assert_allclose(turned, (rest - root) @ rot.T + root, atol=1e-5)


PUBLISHED_DECA_KEYS = {
    "encoder.conv1.weight": (64, 3, 7, 7),
    "encoder.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "encoder.layer2.0.downsample.1.running_mean": (512,),
    "layers.0.weight": (1024, 2048),
    "layers.2.weight": (236, 1024),
    "layers.2.bias": (236,),
}


def test_deca_checkpoint_encode_decode_and_repose(flame_pkl, tmp_path):
    from rigface.face.backends import make_deca
    from rigface.face.backends.deca import DecaEncoder, orthographic_pixels
    from rigface.face.config import FaceConfig

    torch.manual_seed(0)
    enc = DecaEncoder()
    state = enc.state_dict()
    for key, shape in PUBLISHED_DECA_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    bias = torch.randn(236) * 0.1
    state["layers.2.weight"] = torch.zeros(236, 1024)
    state["layers.2.bias"] = bias
    torch.save({"E_flame": state, "E_detail": {"layers.0.weight": torch.zeros(1)}, "D_detail": {}},
               tmp_path / "deca_model.tar")
    from test_backends_deca_fit import write_deca_assets

    arrays = _flame_arrays()
    arrays["f"] = np.array([[i, i + 1, i + 2] for i in range(N - 2)], np.uint32)  # in range, for the UV template
    write_deca_assets(tmp_path, arrays)
    deca = make_deca(FaceConfig(fit="deca", weights=str(tmp_path)))
    assert deca.uv.n_vertices == N and deca.texture.mean.shape == (256, 256, 3)
    codes = deca.encode(np.zeros((224, 224, 3), np.uint8))
    assert {k: v.shape for k, v in codes.items()} == {"shape": (100,), "tex": (50,), "exp": (50,), "pose": (6,),
                                                      "cam": (3,), "light": (9, 3)}
    np.testing.assert_allclose(codes["light"].ravel(), bias[-27:].numpy(), atol=1e-6)
    verts = deca.vertices(codes)
    assert verts.shape == (N, 3) and np.isfinite(verts).all()
    pix = orthographic_pixels(verts, np.array([2.0, 0.0, 0.0]), 512)
    np.testing.assert_allclose(pix[:, 0], (2 * verts[:, 0] + 1) * 256, rtol=1e-5)
    bad = dict(state)
    bad["layers.2.weight"] = torch.zeros(235, 1024)
    torch.save({"E_flame": bad}, tmp_path / "bad.tar")
    from rigface.face.backends.deca import load_deca_encoder

    with pytest.raises(WeightFormatError, match=r"layers\.2\.weight"):
        load_deca_encoder(tmp_path / "bad.tar")
