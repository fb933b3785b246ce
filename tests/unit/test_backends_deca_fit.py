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


def _head_uvs(n_lat: int = 14, n_lon: int = 20) -> np.ndarray:
    """One UV per vertex of _ellipsoid_head: u around the head (seam at the back), v = 1 at the top."""
    uv = [(0.5, 1.0)]
    for i in range(1, n_lat):
        for j in range(n_lon):
            uv.append((((2 * np.pi * j / n_lon + np.pi) % (2 * np.pi)) / (2 * np.pi), 1.0 - i / n_lat))
    uv.append((0.5, 0.0))
    return np.array(uv)


def write_obj(path, verts: np.ndarray, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray) -> None:
    """head_template.obj's layout: v, vt and 'f v/vt' lines (1-based)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uvs]
    lines += ["f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(f, t)) for f, t in zip(faces, uv_faces)]
    path.write_text("\n".join(lines) + "\n")


def write_texture_npz(path, mean_bgr: np.ndarray, tex_dir: np.ndarray) -> None:
    """FLAME_texture.npz's layout: 'mean' (N, N, 3) and 'tex_dir' (N, N, 3, K), BGR, 0..255."""
    np.savez(path, mean=mean_bgr.astype(np.float32), tex_dir=tex_dir.astype(np.float32))


def write_landmark_embedding(path, faces_idx: np.ndarray, bary: np.ndarray) -> None:
    """landmark_embedding.npy's layout: a pickled dict whose dynamic-contour entries are torch tensors."""
    emb = {"static_lmk_faces_idx": faces_idx.astype(np.int64), "static_lmk_bary_coords": bary.astype(np.float32),
           "dynamic_lmk_faces_idx": torch.zeros(79, 17, dtype=torch.long),
           "dynamic_lmk_bary_coords": torch.zeros(79, 17, 3), "full_lmk_faces_idx": faces_idx[None, :68],
           "full_lmk_bary_coords": bary[None]}
    np.save(path, np.array(emb, dtype=object), allow_pickle=True)


TEX_N = 32  # texture side of the test texture space (the real one is 512, resized to 256 as DECA does)


def write_deca_assets(root, arrays: dict | None = None, seed: int = 2) -> None:
    """FLAME pickle, UV template, texture space and landmark embedding for the ellipsoid head, in `root`."""
    arrays = arrays or _flame_head_arrays()
    _write_chumpy_pickle(arrays, root / "generic_model.pkl")
    v, f = arrays["v_template"], arrays["f"].astype(np.int64)
    write_obj(root / "head_template.obj", v, f, _head_uvs(), f)
    rng = np.random.default_rng(seed)
    mean = np.full((TEX_N, TEX_N, 3), 150.0)
    mean[..., 0] = 110.0  # BGR: blue lower than red, so a BGR/RGB mix-up shows
    write_texture_npz(root / "FLAME_texture.npz", mean, rng.normal(0, 5, (TEX_N, TEX_N, 3, 60)))
    faces_idx = rng.integers(0, len(f), 51)
    bary = rng.dirichlet(np.ones(3), 51)
    write_landmark_embedding(root / "landmark_embedding.npy", faces_idx, bary)


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
    write_deca_assets(root)
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


def test_render_moves_with_the_pose_code(fits):
    from rigface.face import build_conditions, render_fit

    front, rolled = fits["front"], fits["rolled"]
    assert abs(rolled.pose.roll) == pytest.approx(np.degrees(0.5), abs=0.05)
    base = render_fit(front, front, front)
    moved = render_fit(rolled, rolled, rolled)
    a, b = base.sum(2) > 0, moved.sum(2) > 0
    assert (a & b).sum() / (a | b).sum() < 0.8
    # Rolling about the neck (below the head) swings the head sideways in the image.
    assert abs(np.nonzero(b)[1].mean() - np.nonzero(a)[1].mean()) > 10
    # Same expression on both sides: the pose edit is the target's own render.
    np.testing.assert_array_equal(build_conditions(front, rolled, "pose").render, moved)
    plain = dataclasses.replace(front, deca=None, triangles=None)
    with pytest.raises(ValueError, match="not a DECA fit"):
        build_conditions(front, plain, "pose")
    elsewhere = dataclasses.replace(front, deca={**front.deca, "texture": "/nonexistent/FLAME_texture.npz"})
    with pytest.raises(FileNotFoundError, match="FLAME_texture.npz"):
        render_fit(elsewhere, elsewhere, elsewhere)


def _other(fit: FaceFit, **codes) -> FaceFit:
    new = {k: np.array(v, copy=True) for k, v in fit.deca["codes"].items()}
    for k, v in codes.items():
        new[k] = np.asarray(v, np.float32).reshape(new[k].shape)
    return dataclasses.replace(fit, deca={**fit.deca, "codes": new})


def test_per_edit_code_swapping_follows_the_table(fits):
    """Every edit's render is drawn from the codes DECA_CODE_SOURCES names (the paper's lighting, see there)."""
    from rigface.face import build_conditions
    from rigface.face.backends.deca_fit import DECA_CODE_SOURCES, codes_for_edit, render_deca

    rng = np.random.default_rng(5)
    src = _other(fits["front"], tex=rng.normal(0, 1, 50), shape=rng.normal(0, 1, 100))
    tgt = _other(fits["front"], pose=[0.1, 0.3, 0.0, 0.4, 0, 0], cam=[6.5, 0.02, 0.0], exp=rng.normal(0, 2, 50),
                 tex=rng.normal(0, 1, 50), light=np.array(src.deca["codes"]["light"]) * 0.5)
    tgt = dataclasses.replace(tgt, deca={**tgt.deca, "box": tuple(np.array(tgt.deca["box"]) + [6.0, -4.0, 10.0])})
    assert DECA_CODE_SOURCES == {
        "expression": {"head": "source", "expression": "target", "light": "source"},
        "pose": {"head": "target", "expression": "source", "light": "source"},
        "lighting": {"head": "source", "expression": "source", "light": "target"},
        "all": {"head": "target", "expression": "target", "light": "target"},
    }
    s, t = src.deca["codes"], tgt.deca["codes"]
    expect = {  # code -> which side, written out per edit
        "expression": {"shape": s, "tex": s, "cam": s, "glob": s, "exp": t, "jaw": t, "light": s},
        "pose": {"shape": t, "tex": t, "cam": t, "glob": t, "exp": s, "jaw": s, "light": s},
        "lighting": {"shape": s, "tex": s, "cam": s, "glob": s, "exp": s, "jaw": s, "light": t},
        "all": {"shape": t, "tex": t, "cam": t, "glob": t, "exp": t, "jaw": t, "light": t},
    }
    renders = {}
    for edit, want in expect.items():
        codes, head = codes_for_edit(s, t, edit)
        for k in ("shape", "tex", "cam", "exp", "light"):
            np.testing.assert_array_equal(codes[k], want[k][k], err_msg=f"{edit}: {k}")
        np.testing.assert_array_equal(codes["pose"][:3], want["glob"]["pose"][:3], err_msg=f"{edit}: global pose")
        np.testing.assert_array_equal(codes["pose"][3:], want["jaw"]["pose"][3:], err_msg=f"{edit}: jaw")
        by = {"source": src, "target": tgt}
        role = DECA_CODE_SOURCES[edit]
        renders[edit] = build_conditions(src, tgt, edit).render
        np.testing.assert_array_equal(
            renders[edit], render_deca(by[role["head"]], by[role["expression"]], by[role["light"]], 512))
    assert len({r.tobytes() for r in renders.values()}) == 4  # four different renders
    # The paper's lighting edit darkens (target light x 0.5); the authors' script as written would not.
    lit, same = renders["lighting"], build_conditions(src, src, "lighting").render
    np.testing.assert_array_equal(lit.sum(2) > 0, same.sum(2) > 0)
    assert lit.astype(int).sum() < 0.7 * same.astype(int).sum()


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
    (tmp_path / "deca_model.tar").write_bytes((weights_dir / "deca_model.tar").read_bytes())
    with pytest.raises(WeightFileMissing) as err:  # texture, UV and landmarks named together, nothing loaded
        FaceAnalyzer(FaceConfig(fit="deca", weights=str(tmp_path)))
    for name in ("FLAME_texture.npz", "head_template.obj", "landmark_embedding.npy"):
        assert name in str(err.value)


def test_uv_texture_sampling_puts_a_checkerboard_where_the_uv_map_says(tmp_path):
    """A square facing the camera, UV (0..1) over it: each rendered pixel shows the checker cell its UV names."""
    from rigface.face.backends.deca_fit import DECA_SH_CONSTANTS, render_uv_textured
    from rigface.face.backends.flame import load_head_template

    x0, side = 100.0, 300.0
    verts = np.array([[x0, x0, 0.0], [x0 + side, x0, 0.0], [x0, x0 + side, 0.0], [x0 + side, x0 + side, 0.0]])
    uvs = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # top-left of the image = v 1 (top texel row)
    faces = np.array([[0, 2, 1], [1, 2, 3]])  # counter-clockwise seen from the camera (view frame, y up)
    write_obj(tmp_path / "quad.obj", verts * [1, -1, 1], faces, uvs, faces)
    quad = load_head_template(tmp_path / "quad.obj")
    np.testing.assert_array_equal(quad.faces, faces)
    np.testing.assert_allclose(quad.uvs, uvs)
    cells, texels = 8, 64
    rows, cols = np.mgrid[:texels, :texels] // (texels // cells)
    checker = np.where((rows + cols) % 2 == 0, 0.9, 0.2)[..., None] * np.array([1.0, 0.8, 0.6])
    light = np.zeros((9, 3))
    light[0] = 1.0 / DECA_SH_CONSTANTS[0]  # ambient 1: the image is the albedo
    image, cover = render_uv_textured(verts.astype(np.float32), quad.faces, quad.uvs, quad.uv_faces, checker,
                                      light, 512)
    assert cover[110:390, 110:390].all() and not cover[:95].any() and not cover[:, 405:].any()
    assert (image[~cover] == 0).all()  # black background
    ys, xs = np.mgrid[x0 + 2 : x0 + side - 2, x0 + 2 : x0 + side - 2].astype(int)
    u = (xs + 0.5 - x0) / side
    row_t, col_t = (ys + 0.5 - x0) / side * texels, u * texels  # texel coordinates (v = 1 at row 0)
    step = texels // cells
    inner = (np.abs(row_t / step - np.round(row_t / step)) * step > 1) & (np.abs(col_t / step - np.round(col_t / step)) * step > 1)
    cell = (np.floor(row_t / step) + np.floor(col_t / step)) % 2 == 0
    expected = np.where(cell, 0.9, 0.2)[..., None] * np.array([1.0, 0.8, 0.6])
    got = image[ys, xs] / 255.0
    assert inner.sum() > 20000
    np.testing.assert_allclose(got[inner], expected[inner], atol=1.5 / 255)


def test_flame_texture_space_is_decas_flametex(tmp_path):
    from rigface.face.backends.flame import load_flame_texture

    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 255, (TEX_N, TEX_N, 3))
    tex_dir = rng.normal(0, 10, (TEX_N, TEX_N, 3, 60))
    write_texture_npz(tmp_path / "t.npz", mean, tex_dir)
    code = rng.normal(0, 1, 50)
    tex = load_flame_texture(tmp_path / "t.npz", uv_size=16)
    # DECA: (mean + dirs[:, :50] @ code) / 255, reshaped, nearest-resized to the UV size, BGR -> RGB.
    full = (mean.reshape(-1) + tex_dir.reshape(-1, 60)[:, :50] @ code).reshape(TEX_N, TEX_N, 3) / 255.0
    expected = torch.nn.functional.interpolate(torch.from_numpy(full).permute(2, 0, 1)[None], [16, 16])[0]
    expected = expected.permute(1, 2, 0).numpy()[..., ::-1]
    np.testing.assert_allclose(tex(code), expected, atol=1e-5)
    np.savez(tmp_path / "bad.npz", mean=mean)
    from rigface.face.backends import WeightFormatError

    with pytest.raises(WeightFormatError, match="'mean' and 'tex_dir'"):
        load_flame_texture(tmp_path / "bad.npz")
    write_texture_npz(tmp_path / "few.npz", mean, tex_dir[..., :20])
    with pytest.raises(WeightFormatError, match=r"K >= 50"):
        load_flame_texture(tmp_path / "few.npz")


def test_render_covers_scalp_and_ears_with_the_texture(fits):
    """The whole FLAME head is drawn: vertices on top of the head and at its sides (where the ears are) land
    on covered, textured pixels; nothing is copied from the photo (the texture is uniform here)."""
    from rigface.face import render_fit

    fit = fits["front"]
    render = render_fit(fit, fit, fit)
    v = _flame_head_arrays()["v_template"]
    scalp = np.flatnonzero((v[:, 1] > 0.09) & (v[:, 2] > 0))  # top of the head, turned to the camera
    ears = np.flatnonzero((np.abs(v[:, 0]) > 0.075) & (np.abs(v[:, 1] - 0.02) < 0.03) & (np.abs(v[:, 2]) < 0.03))
    assert len(scalp) >= 3 and len(ears) >= 2
    for idx in (scalp, ears):
        xy = np.round(fit.mesh[idx, :2]).astype(int)
        inside = [(x, y) for x, y in xy if 2 <= x < 510 and 2 <= y < 510]
        assert inside
        for x, y in inside:  # a 5x5 patch around the vertex holds rendered skin
            assert (render[y - 2 : y + 3, x - 2 : x + 3].sum(2) > 0).mean() > 0.3, (x, y)
    covered = render.sum(2) > 0
    # Texture albedo (mean 150/150/110 in BGR -> red > blue), not the astronaut's pixels.
    r, b = render[covered][:, 0].astype(float), render[covered][:, 2].astype(float)
    assert (r >= b).mean() > 0.95


def test_align_ffhq_recentres_the_mesh_by_the_authors_formula(fits, weights_dir):
    """delta = centre(head's own codes) - centre(swapped codes), centre = eye avg + 0.1 (mouth avg - eye avg)
    of the 68 landmarks (static barycentric embedding); the vertices move by delta before the camera."""
    from rigface.face.backends.deca_fit import ffhq_center, place_mesh, render_deca, render_uv_textured, swap_codes
    from rigface.face.backends.flame import FLAME, load_flame_pickle, load_head_template, load_landmark_embedding

    flame = FLAME(load_flame_pickle(weights_dir / "generic_model.pkl"))
    lmk_faces, bary = load_landmark_embedding(weights_dir / "landmark_embedding.npy")
    head = fits["front"]
    other = _other(head, exp=np.full(50, 40.0), pose=[0, 0, 0, 0.5, 0, 0])  # a strong expression: the centre moves
    own, swapped = head.deca["codes"], swap_codes(head.deca["codes"], other.deca["codes"], head.deca["codes"])

    def centre(codes):  # written out here from DECA's decode
        z = {k: torch.from_numpy(np.asarray(codes[k], np.float32))[None] for k in ("shape", "exp", "pose")}
        verts = flame(z["shape"], z["exp"], z["pose"])[0].double().numpy()
        f = flame.faces.numpy()
        lm = np.zeros((68, 3))
        for i in range(51):
            lm[17 + i] = bary[i] @ verts[f[lmk_faces[i]]]
        eye = (lm[36:42].mean(0) + lm[42:48].mean(0)) * 0.5
        mouth = (lm[48] + lm[54]) * 0.5
        return eye + (mouth - eye) * 0.1

    np.testing.assert_allclose(ffhq_center(flame, own, (lmk_faces, bary), flame.faces.numpy()), centre(own), atol=1e-9)
    delta = centre(own) - centre(swapped)
    assert np.linalg.norm(delta) > 1e-4
    box = head.deca["box"]
    plain, aligned = place_mesh(flame, swapped, box), place_mesh(flame, swapped, box, world_offset=delta)
    k = plain.scale  # crop pixels per FLAME unit; image frame = view frame with y and z flipped
    np.testing.assert_allclose(aligned.mesh - plain.mesh, np.tile(k * delta * [1, -1, -1], (len(plain.mesh), 1)),
                               atol=1e-3)
    uv = load_head_template(weights_dir / "head_template.obj")
    from rigface.face.backends.flame import load_flame_texture

    expected, _ = render_uv_textured(aligned.mesh, uv.faces, uv.uvs, uv.uv_faces,
                                     load_flame_texture(weights_dir / "FLAME_texture.npz")(swapped["tex"]),
                                     swapped["light"].reshape(9, 3), 512)
    np.testing.assert_array_equal(render_deca(head, other, head, 512), expected)


def test_deca_crop_comes_from_the_68_landmark_box(fits):
    """DECA's input crop as the authors take it: FAN's 68-point box, side (w + h) / 2 x 1.1 x 1.3, same centre."""
    from rigface.face.backends.deca_fit import LM68_FROM_MP478, deca_box, landmarks68_box

    assert len(LM68_FROM_MP478) == 68 and len(set(LM68_FROM_MP478)) == 68
    lm = np.zeros((478, 3), np.float32)
    lm[:, :2] = 250.0
    lm[234, 0], lm[454, 0], lm[105, 1], lm[152, 1] = 150.0, 330.0, 120.0, 380.0  # jaw sides, brow top, chin
    lm[10, 1] = 40.0  # the forehead top of MediaPipe's mesh is not one of the 68 points
    assert landmarks68_box(lm) == (150.0, 120.0, 330.0, 380.0)
    x0, y0, side = deca_box(landmarks68_box(lm))
    assert side == pytest.approx((180 + 260) / 2 * 1.1 * 1.3)
    assert (x0 + side / 2, y0 + side / 2) == pytest.approx((240.0, 250.0))
    fit = fits["front"]  # the analyzer crops DECA's input this way from its landmarks (not the detector's box)
    np.testing.assert_allclose(fit.deca["box"], deca_box(landmarks68_box(fit.landmarks)), atol=1e-3)
