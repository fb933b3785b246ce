"""fit="deca" in FaceAnalyzer: DECA crop, FLAME mesh in the 512 crop, SH conversion, renders and re-posing.

DECA's weights are random except the last layer, whose bias sets the codes (its weight is zero), so each
test knows the codes the encoder returns. FLAME is a small ellipsoid head with FLAME2020's array layout.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import torch

import face_media as fm  # noqa: E402
from test_backends_deca import _write_chumpy_pickle  # noqa: E402

from rigface.face.backends.deca import CODE_SPLITS  # noqa: E402
from rigface.face.config import FaceConfig  # noqa: E402
from rigface.face.types import FaceFit  # noqa: E402

ROOT_Y = -0.09  # the root (neck) joint sits at the bottom of the head: rotations about it move the head


def _ellipsoid_head(n_lat: int = 14, n_lon: int = 20):
    """Vertices (m, FLAME axes: x right, y up, z towards the camera) and outward CCW triangles."""
    verts = [(0.0, 0.11, 0.0)]
    for i in range(1, n_lat):
        theta = np.pi * i / n_lat
        for j in range(n_lon):
            phi = 2 * np.pi * j / n_lon
            verts.append((0.08 * np.sin(theta) * np.sin(phi), 0.11 * np.cos(theta), 0.09 * np.sin(theta) * np.cos(phi)))
    verts.append((0.0, -0.11, 0.0))
    v = np.array(verts) + np.array([0.0, 0.02, 0.0])
    ring = lambda i, j: 1 + (i - 1) * n_lon + j % n_lon  # noqa: E731
    faces = [(0, ring(1, j), ring(1, j + 1)) for j in range(n_lon)]
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            faces += [(a, c, b), (b, c, d)]
    last = len(v) - 1
    faces += [(ring(n_lat - 1, j), last, ring(n_lat - 1, j + 1)) for j in range(n_lon)]
    f = np.array(faces)
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = (normal * (tri.mean(1) - v.mean(0))).sum(1) < 0
    f[inward] = f[inward][:, ::-1]
    return v, f


def _flame_head_arrays() -> dict:
    import scipy.sparse

    v, f = _ellipsoid_head()
    n = len(v)
    jaw = (v[:, 1] < -0.03) & (v[:, 2] > 0)
    weights = np.zeros((n, 5))
    weights[:, 0] = 1.0
    weights[jaw] = [0.0, 0.0, 1.0, 0.0, 0.0]
    jreg = np.zeros((5, n))
    bottom = n - 1  # the south pole: root and neck joints
    jreg[0, bottom] = jreg[1, bottom] = 1.0
    chin = np.flatnonzero(jaw)
    jreg[2, chin] = 1.0 / len(chin)
    jreg[3, :5] = jreg[4, 5:10] = 0.2
    rng = np.random.default_rng(1)
    return {
        "v_template": v,
        "shapedirs": rng.normal(0, 1e-4, (n, 3, 400)),
        "posedirs": np.zeros((n, 3, 36)),
        "J_regressor": scipy.sparse.csc_matrix(jreg),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "f": f.astype(np.uint32),
        "bs_style": "lbs",
    }


def _codes(**over) -> dict[str, np.ndarray]:
    codes = {k: np.zeros(n, np.float32) for k, n in CODE_SPLITS.items()}
    codes["cam"] = np.array([6.0, 0.0, 0.0], np.float32)
    light = np.zeros((9, 3), np.float32)
    light[0], light[3] = 3.0, 1.0  # ambient + light from the camera side (DECA's z term)
    codes["light"] = light.ravel()
    for k, v in over.items():
        codes[k] = np.asarray(v, np.float32).ravel()
    return codes


def _bias(codes: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([codes[k] for k in CODE_SPLITS]))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    from rigface.face.backends.deca import DecaEncoder

    root = tmp_path_factory.mktemp("deca_weights")
    _write_chumpy_pickle(_flame_head_arrays(), root / "generic_model.pkl")
    torch.manual_seed(0)
    state = DecaEncoder().state_dict()
    state["layers.2.weight"] = torch.zeros(236, 1024)
    state["layers.2.bias"] = _bias(_codes())
    torch.save({"E_flame": state, "E_detail": {}, "D_detail": {}}, root / "deca_model.tar")
    return root


@pytest.fixture(scope="module")
def analyzer(weights_dir):
    from rigface.face import FaceAnalyzer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster for these small models
    a = FaceAnalyzer(FaceConfig(fit="deca", weights=str(weights_dir)))
    yield a
    a.close()
    torch.set_num_threads(threads)


def _analyze(analyzer, **codes) -> FaceFit:
    analyzer.deca.encoder.layers[2].bias.data = _bias(_codes(**codes))
    fit = analyzer.analyze(fm.astronaut())
    assert isinstance(fit, FaceFit), fit
    return fit


@pytest.fixture(scope="module")
def fits(analyzer):
    return {
        "front": _analyze(analyzer),
        "rolled": _analyze(analyzer, pose=[0.0, 0.0, 0.5, 0, 0, 0]),
        "jaw": _analyze(analyzer, pose=[0, 0, 0, 0.6, 0, 0]),
    }


def _deca_shading(normals: np.ndarray, light: np.ndarray) -> np.ndarray:
    """DECA's renderer.add_SHlight, written from its source (constant_factor and basis order)."""
    pi = np.pi
    const = np.array([1 / np.sqrt(4 * pi), ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))),
                      ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))),
                      ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))), (pi / 4) * (3) * (np.sqrt(5 / (12 * pi))),
                      (pi / 4) * (3) * (np.sqrt(5 / (12 * pi))), (pi / 4) * (3) * (np.sqrt(5 / (12 * pi))),
                      (pi / 4) * (3 / 2) * (np.sqrt(5 / (12 * pi))), (pi / 4) * (1 / 2) * (np.sqrt(5 / (4 * pi)))])
    x, y, z = normals.T
    sh = np.stack([x * 0 + 1, x, y, z, x * y, x * z, y * z, x**2 - y**2, 3 * z**2 - 1], 1) * const
    return sh @ light


def test_lighting_conversion_is_exact_against_decas_formula():
    from rigface.face import geometry
    from rigface.face.backends.deca_fit import deca_sh_to_project

    rng = np.random.default_rng(3)
    n = rng.normal(size=(500, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    light = rng.normal(size=(9, 3))
    np.testing.assert_allclose(geometry.shade(n, deca_sh_to_project(light)), _deca_shading(n, light), atol=2e-6)
    assert not np.allclose(geometry.shade(n, light.astype(np.float32)), _deca_shading(n, light), atol=1e-2)
    with pytest.raises(ValueError, match=r"\(9, 3\)"):
        deca_sh_to_project(np.zeros(27))


def test_placed_mesh_is_decas_orthographic_projection_in_the_crop():
    from rigface.face.backends.deca import orthographic_pixels
    from rigface.face.backends.deca_fit import place_mesh
    from rigface.face.backends.flame import FLAME

    flame = FLAME({k: (v.toarray() if hasattr(v, "toarray") else v) for k, v in _flame_head_arrays().items()})
    codes = _codes(pose=[0.2, -0.4, 0.1, 0.3, 0, 0], cam=[7.0, 0.01, -0.02], exp=np.full(50, 0.5))
    box = (100.0, 120.0, 300.0)
    geo = place_mesh(flame, codes, box)
    z = {k: torch.from_numpy(codes[k])[None] for k in ("shape", "exp", "pose")}
    world = flame(z["shape"], z["exp"], z["pose"])[0].numpy()
    expected = orthographic_pixels(world, codes["cam"], 224) * (box[2] / 224) + np.array([box[0], box[1], 0.0])
    np.testing.assert_allclose(geo.mesh, expected, atol=1e-3)  # crop pixels
    np.testing.assert_allclose(geo.rotation @ geo.rotation.T, np.eye(3), atol=1e-6)


def test_analyzer_deca_fit_renders_inside_the_crop(fits, analyzer):
    from rigface.face import render_fit
    from rigface.face.backends.deca_fit import deca_sh_to_project

    fit = fits["front"]
    n_verts = len(_flame_head_arrays()["v_template"])
    assert fit.mesh.shape == fit.shape.shape == fit.albedo.shape == (n_verts, 3)
    assert fit.triangles.shape[1] == 3 and fit.backends["fit"].startswith("deca:")
    assert fit.expression.shape == (52,)  # the expression backend is unchanged (blendshapes by default)
    np.testing.assert_allclose(fit.lighting, deca_sh_to_project(_codes()["light"].reshape(9, 3)), atol=1e-5)
    np.testing.assert_allclose(fit.pose.angles(), 0.0, atol=1e-3)
    assert ((fit.albedo >= 0) & (fit.albedo <= 1)).all()
    x0, y0, side = fit.deca["box"]
    assert 0 < x0 < 256 < x0 + side < 512 and 0 < y0 < 256 < y0 + side < 512  # around the face, in the crop
    render = render_fit(fit, fit, fit)
    cover = render.sum(2) > 0
    assert render.shape == (512, 512, 3) and cover.sum() > 0.1 * side**2
    ys, xs = np.nonzero(cover)
    assert x0 - 1 <= xs.min() and xs.max() <= x0 + side + 1 and y0 - 1 <= ys.min() and ys.max() <= y0 + side + 1
    # The render is drawn from the fit's own mesh: its centre is the mesh's projected centre.
    np.testing.assert_allclose([xs.mean(), ys.mean()], fit.mesh[:, :2].mean(0), atol=0.05 * side)
    # Called without the detector's box, the DECA crop comes from the landmarks: about the same place.
    again = analyzer.fit_crop(fit.crop, fit.crop_box, fit.frame_size, {})
    assert isinstance(again, FaceFit)
    ax0, ay0, aside = again.deca["box"]
    assert abs(ax0 + aside / 2 - x0 - side / 2) < 0.15 * side and abs(ay0 + aside / 2 - y0 - side / 2) < 0.25 * side
    meta = json.loads(json.dumps(fit.to_meta()))
    assert meta["deca"]["codes"]["cam"] == [6.0, 0.0, 0.0] and len(meta["deca"]["codes"]["light"]) == 9


def test_render_moves_with_the_pose_code_and_edits_swap_codes(fits):
    from rigface.face import build_conditions, render_fit

    front, rolled, jaw = fits["front"], fits["rolled"], fits["jaw"]
    assert abs(rolled.pose.roll) == pytest.approx(np.degrees(0.5), abs=0.05)
    base = render_fit(front, front, front)
    moved = render_fit(rolled, rolled, rolled)
    a, b = base.sum(2) > 0, moved.sum(2) > 0
    assert (a & b).sum() / (a | b).sum() < 0.8
    # Rolling about the neck (below the head) swings the head sideways in the image.
    assert abs(np.nonzero(b)[1].mean() - np.nonzero(a)[1].mean()) > 10
    pose = build_conditions(front, rolled, "pose")
    # The source's FLAME shape and albedo in the target's pose: the target's silhouette, the source's colours.
    np.testing.assert_array_equal(pose.render.sum(2) > 0, b)
    np.testing.assert_array_equal(pose.render, render_fit(front, rolled, front))
    # The jaw is expression: pose edits keep the source's, expression edits take the target's.
    np.testing.assert_array_equal(build_conditions(front, jaw, "pose").render, base)
    opened = build_conditions(front, jaw, "expression").render
    assert (opened != base).any(axis=2).sum() > 50
    np.testing.assert_array_equal(opened.sum(2) > 0, render_fit(jaw, jaw, jaw).sum(2) > 0)
    lit = dataclasses.replace(front, lighting=front.lighting * 0.5)
    relit = build_conditions(front, lit, "lighting").render
    np.testing.assert_array_equal(relit.sum(2) > 0, a)  # same coverage, darker
    assert relit.astype(int).sum() < 0.8 * base.astype(int).sum()
    plain = dataclasses.replace(front, deca=None, triangles=None)
    with pytest.raises(ValueError, match="not a DECA fit"):
        build_conditions(front, plain, "pose")
    elsewhere = dataclasses.replace(front, deca={**front.deca, "flame": "/nonexistent/generic_model.pkl"})
    with pytest.raises(FileNotFoundError, match="FLAME model of this DECA fit"):
        render_fit(elsewhere, front, front)


def test_degenerate_deca_camera_gives_a_fit_failed_skip(analyzer):
    from rigface.face.types import FaceSkip, SkipReason

    analyzer.deca.encoder.layers[2].bias.data = _bias(_codes(cam=[-2.0, 0.0, 0.0]))
    skip = analyzer.analyze(fm.astronaut())
    assert isinstance(skip, FaceSkip) and skip.reason == SkipReason.fit_failed and "camera scale" in skip.detail


def test_missing_deca_file_is_named_before_any_model_loads(weights_dir, tmp_path, monkeypatch):
    import rigface.face.analyzer as analyzer_mod
    from rigface.face import FaceAnalyzer
    from rigface.face.backends import WeightFileMissing

    (tmp_path / "generic_model.pkl").write_bytes((weights_dir / "generic_model.pkl").read_bytes())

    def no_work(*args, **kwargs):
        raise AssertionError("a model was built before the weight files were checked")

    monkeypatch.setattr(analyzer_mod, "make_detector", no_work)
    with pytest.raises(WeightFileMissing, match=r"DECA checkpoint \(fit=deca\).*deca_model\.tar"):
        FaceAnalyzer(FaceConfig(fit="deca", weights=str(tmp_path)))
    with pytest.raises(WeightFileMissing, match=r"FLAME 2020 model"):
        FaceAnalyzer(FaceConfig(fit="deca", weights=str(tmp_path), flame_model="missing.pkl"))
