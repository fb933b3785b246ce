"""Deep3DFaceRecon and BiSeNet backends on random weights of the published shapes, built here."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import scipy.io as scipy_io
import torch

from rigface.face.backends import WeightFileMissing, WeightFormatError, preflight, required_files
from rigface.face.config import FaceConfig


def test_importing_face_packages_stays_light():
    code = (
        "import sys, rigface.face, rigface.face.types, rigface.face.config, rigface.face.backends;"
        "print(sorted(m for m in ('torch', 'cv2', 'mediapipe', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- Deep3DFaceRecon -----------------------------------------------------------------------------------
N_BFM = 400  # vertices of the test BFM (the real front BFM has 35709; the loader takes any consistent size)


def _bfm_dict(n: int = N_BFM, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 0.5, (n, 3)).astype(np.float32) + np.array([0.0, 0.0, 0.3], np.float32)
    return {
        "meanshape": mean.reshape(1, -1),
        "idBase": rng.normal(0, 1e-3, (3 * n, 80)).astype(np.float32),
        "exBase": rng.normal(0, 1e-3, (3 * n, 64)).astype(np.float32),
        "meantex": rng.uniform(50, 200, (1, 3 * n)).astype(np.float32),
        "texBase": rng.normal(0, 1, (3 * n, 80)).astype(np.float32),
        "tri": (rng.integers(0, n, (2 * n, 3)) + 1).astype(np.float64),
        "point_buf": (rng.integers(0, 2 * n, (n, 8)) + 1).astype(np.float64),
        "keypoints": (rng.choice(n, 68, replace=False) + 1).astype(np.float64).reshape(1, 68),
    }


def _random_reconnet(variant, exp_bias, angle_bias):
    from rigface.face.backends.deep3d import ReconNet

    net = ReconNet(variant)
    with torch.no_grad():
        for layer in net.heads:  # the published init: zero weights (so the output is the bias here)
            layer.weight.zero_()
            layer.bias.normal_()
        net.heads[1].bias.copy_(exp_bias)
        net.heads[3].bias.copy_(angle_bias)
    return net.state_dict()


@pytest.fixture(scope="module")
def d3d_files(tmp_path_factory):
    from rigface.face.backends.deep3d import FACE_ADAPTER, ORIGINAL

    root = tmp_path_factory.mktemp("d3d")
    torch.manual_seed(0)
    exp_bias = torch.linspace(-1, 1, 64)
    angle_bias = torch.tensor([0.0, 0.3, 0.0])  # a pure yaw of 0.3 rad
    fa_state = _random_reconnet(FACE_ADAPTER, exp_bias, angle_bias)
    state = _random_reconnet(ORIGINAL, exp_bias, angle_bias)
    torch.save({"net_recon": state, "epoch": 20}, root / "epoch_20.pth")
    torch.save({"module." + k: v for k, v in fa_state.items()}, root / "d3dfr_res50_nofc.pth")  # DataParallel names
    scipy_io.savemat(root / "BFM_model_front.mat", _bfm_dict())
    return {"root": root, "exp": exp_bias.numpy(), "angle": angle_bias.numpy(), "state": state, "fa_state": fa_state}


# Face-Adapter's getd3dfr_res50 (third_party/model_resnet_d3dfr.py): torchvision ResNet-50 without fc under
# `backbone.`, eight 1x1 conv heads under `fianl_layers.` (sic).
FACE_ADAPTER_D3D_KEYS = {
    "backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.bn1.running_mean": (64,),
    "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
    "backbone.layer3.5.conv2.weight": (256, 256, 3, 3),
    "backbone.layer4.2.bn3.running_var": (2048,),
    "fianl_layers.0.weight": (80, 2048, 1, 1),
    "fianl_layers.1.weight": (64, 2048, 1, 1),
    "fianl_layers.2.bias": (80,),
    "fianl_layers.3.weight": (3, 2048, 1, 1),
    "fianl_layers.4.bias": (27,),
    "fianl_layers.5.weight": (2, 2048, 1, 1),
    "fianl_layers.6.bias": (1,),
    "fianl_layers.7.weight": (4, 2048, 1, 1),
}
PUBLISHED_D3D_KEYS = {k.replace("fianl_layers", "final_layers"): v for k, v in FACE_ADAPTER_D3D_KEYS.items()
                      if not k.startswith("fianl_layers.7")}


def test_reconnet_key_names_match_both_published_checkpoints():
    from rigface.face.backends.deep3d import FACE_ADAPTER, NUM_COEFFS, ORIGINAL, ReconNet

    fa = ReconNet(FACE_ADAPTER).state_dict()
    assert {k: tuple(fa[k].shape) for k in FACE_ADAPTER_D3D_KEYS} == FACE_ADAPTER_D3D_KEYS
    assert sum(fa[f"fianl_layers.{i}.bias"].shape[0] for i in range(8)) == 261
    assert len([k for k in fa if k.startswith("backbone.")]) == 318  # torchvision resnet50 minus fc.weight/bias
    orig = ReconNet(ORIGINAL).state_dict()
    for key, shape in PUBLISHED_D3D_KEYS.items():
        assert tuple(orig[key].shape) == shape, key
    assert not any(k.startswith("backbone.fc") for k in {**fa, **orig})  # the 'nofc' trunk
    assert sum(orig[f"final_layers.{i}.bias"].shape[0] for i in range(7)) == NUM_COEFFS == 257


FIVE = np.array([[120, 130], [180, 126], [152, 165], [127, 200], [176, 197]], np.float32)


def test_face_adapter_variant_loads_and_yields_64_expression_coefficients(d3d_files):
    from rigface.face.backends import make_deep3d

    model = make_deep3d(FaceConfig(expression="deep3d", weights=str(d3d_files["root"])))  # the default file
    assert model.variant.name == "face_adapter" and model.input_size == 256
    assert model.version == "face_adapter/d3dfr_res50_nofc.pth@256"
    loaded = model.net.state_dict()
    for key in FACE_ADAPTER_D3D_KEYS:
        torch.testing.assert_close(loaded[key], d3d_files["fa_state"][key])
    res = model(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8), FIVE)
    assert res.expression.shape == (64,) and res.expression.dtype == np.float32
    np.testing.assert_allclose(res.expression, d3d_files["exp"], atol=1e-5)  # coefficients 80:144
    assert res.coeffs["pupil"].shape == (4,)
    np.testing.assert_allclose(res.coeffs["pupil"], d3d_files["fa_state"]["fianl_layers.7.bias"].numpy(), atol=1e-5)
    assert res.angles_deg[0] == pytest.approx(math.degrees(0.3), abs=1e-3)


def test_face_adapter_alignment_is_the_least_squares_similarity_onto_the_template(d3d_files):
    from skimage.transform import SimilarityTransform

    from rigface.face.backends import make_deep3d
    from rigface.face.backends.deep3d import face_adapter_template

    model = make_deep3d(FaceConfig(expression="deep3d", weights=str(d3d_files["root"])))
    # The template written out from Face-Adapter's mean_face_lm5p_256: ((x96 + 8) * 2 + 16, y * 2).
    x96 = np.array([30.2946, 65.5318, 48.0252, 33.5493, 62.7299])
    y = np.array([51.6963, 51.5014, 71.7366, 92.3655, 92.2041])
    np.testing.assert_allclose(face_adapter_template(256), np.stack([(x96 + 8) * 2 + 16, y * 2], 1), atol=1e-4)
    rng = np.random.default_rng(7)
    for _ in range(3):  # rotated, scaled, noisy faces: not an exact similarity, so the least squares matters
        five = FIVE + rng.normal(0, 4, FIVE.shape).astype(np.float32)
        ours = model.alignment((300, 300, 3), five)
        ref = SimilarityTransform.from_estimate(five.astype(np.float64), face_adapter_template(256))
        np.testing.assert_allclose(ours, ref.params[:2], rtol=1e-5, atol=1e-3)
        assert abs(ours[0, 1]) > 1e-4  # a rotation is part of it (POS has none)
    aligned, _ = model.align(np.zeros((300, 300, 3), np.uint8), FIVE)
    assert aligned.shape == (256, 256, 3)


def test_input_range_follows_the_variant(d3d_files):
    from rigface.face.backends import make_deep3d

    seen = {}
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[:128] = 255
    for name, ckpt in (("face_adapter", "d3dfr_res50_nofc.pth"), ("deep3d", "epoch_20.pth")):
        model = make_deep3d(FaceConfig(expression="deep3d", weights=str(d3d_files["root"]), deep3d_checkpoint=ckpt))
        hook = model.net.backbone.conv1.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
        model.regress(rgb)
        hook.remove()
    assert (seen["face_adapter"].min().item(), seen["face_adapter"].max().item()) == (-1.0, 1.0)
    assert (seen["deep3d"].min().item(), seen["deep3d"].max().item()) == (0.0, 1.0)


def test_a_checkpoint_of_neither_layout_is_refused_naming_its_keys(d3d_files, tmp_path):
    from rigface.face.backends.deep3d import load_reconnet

    odd = {k.replace("fianl_layers", "heads"): v for k, v in d3d_files["fa_state"].items()}
    odd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(WeightFormatError, match=r"neither .*unexpected keys: fc\.weight, heads\.0\.bias"):
        load_reconnet(tmp_path / "odd.pth")
    torch.save({"net_recon": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(WeightFormatError, match="not a state dict"):
        load_reconnet(tmp_path / "list.pth")


def test_deep3d_original_variant_regresses_expression_pose_and_lighting(d3d_files):
    from rigface.face.backends import make_deep3d

    cfg = FaceConfig(expression="deep3d", weights=str(d3d_files["root"]), deep3d_checkpoint="epoch_20.pth")
    model = make_deep3d(cfg)
    assert model.variant.name == "deep3d" and model.input_size == 224
    rgb = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    five = np.array([[120, 130], [180, 130], [150, 165], [125, 200], [175, 200]], np.float32)
    res = model(rgb, five)
    assert res.expression.shape == (64,) and res.expression.dtype == np.float32
    np.testing.assert_allclose(res.expression, d3d_files["exp"], atol=1e-5)
    yaw, pitch, roll = res.angles_deg
    assert yaw == pytest.approx(math.degrees(0.3), abs=1e-3) and abs(pitch) < 1e-3 and abs(roll) < 1e-3
    assert res.lighting.shape == (9, 3) and np.isfinite(res.lighting).all()
    assert {k: v.shape[0] for k, v in res.coeffs.items()} == {"id": 80, "exp": 64, "tex": 80, "angle": 3,
                                                               "gamma": 27, "trans": 3}
    assert res.affine[0, 1] == 0.0  # POS: scale and translation only
    xy, z = model.reconstruct(res.coeffs)
    assert xy.shape == (N_BFM, 2) and (z > 0).all()


def test_deep3d_lighting_matches_its_own_sh_formula():
    """Shading with the converted (9, 3) lighting equals Deep3DFaceRecon's SH illumination, written out."""
    from rigface.face.backends.deep3d import gamma_to_lighting
    from rigface.face.geometry import shade

    rng = np.random.default_rng(3)
    gamma = rng.normal(0, 0.3, 27)
    n = rng.normal(size=(50, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    a0, a1, a2 = np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0)
    c0, c1, c2 = 1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi)
    x, y, z = n.T
    basis = np.stack([np.full_like(x, a0 * c0), -a1 * c1 * y, a1 * c1 * z, -a1 * c1 * x, a2 * c2 * x * y,
                      -a2 * c2 * y * z, 0.5 * a2 * c2 / np.sqrt(3.0) * (3 * z**2 - 1), -a2 * c2 * x * z,
                      0.5 * a2 * c2 * (x**2 - y**2)], 1)
    g = gamma.reshape(3, 9).T.copy()
    g[0] += 0.8
    expected = basis @ g
    np.testing.assert_allclose(shade(n.astype(np.float32), gamma_to_lighting(gamma)), expected, rtol=1e-4, atol=1e-5)


def test_five_point_alignment_puts_the_face_at_the_training_size():
    from rigface.face.backends.deep3d import alignment_matrix, five_from_68

    rng = np.random.default_rng(4)
    lm3d5 = five_from_68(rng.normal(0, 0.5, (68, 3)))
    # An image where the face is drawn at 3 px per BFM unit... scaled by s, centred at (200, 150), y down.
    s, cx, cy, h = 70.0, 200.0, 150.0, 400
    five = np.stack([cx + s * lm3d5[:, 0], cy - s * lm3d5[:, 1]], 1)
    for size in (224, 256):
        m = alignment_matrix(five, h, lm3d5, size)
        aligned = five @ m[:, :2].T + m[:, 2]
        k = 102.0 * size / 224.0
        expected = np.stack([size / 2 + k * lm3d5[:, 0], size / 2 - k * lm3d5[:, 1]], 1)
        np.testing.assert_allclose(aligned, expected, atol=1e-3)


def test_deep3d_wrong_shapes_and_missing_files_are_named(d3d_files, tmp_path):
    from rigface.face.backends.deep3d import load_bfm, load_reconnet

    bad = dict(d3d_files["state"])
    bad["final_layers.1.weight"] = torch.zeros(63, 2048, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightFormatError, match=r"final_layers\.1\.weight"):
        load_reconnet(tmp_path / "bad.pth")
    trunc = {k: v for k, v in d3d_files["state"].items() if not k.startswith("final_layers.6")}
    torch.save(trunc, tmp_path / "trunc.pth")
    with pytest.raises(WeightFormatError, match=r"missing keys: final_layers\.6"):
        load_reconnet(tmp_path / "trunc.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightFormatError, match="junk.pth"):
        load_reconnet(tmp_path / "junk.pth")
    bfm = _bfm_dict(100)
    bfm["exBase"] = bfm["exBase"][:, :63]
    scipy_io.savemat(tmp_path / "bad_bfm.mat", bfm)
    with pytest.raises(WeightFormatError, match="exBase"):
        load_bfm(tmp_path / "bad_bfm.mat")
    cfg = FaceConfig(expression="deep3d", mask="bisenet", weights=str(tmp_path))
    with pytest.raises(WeightFileMissing) as err:
        preflight(cfg)
    assert "d3dfr_res50_nofc.pth" in str(err.value) and "BFM_model_front.mat" in str(err.value)
    assert "79999_iter.pth" in str(err.value)


def test_required_files_follow_the_chosen_backends():
    assert required_files(FaceConfig()) == []
    names = [n for n, _ in required_files(FaceConfig(fit="deca", expression="deep3d", mask="bisenet",
                                                     identity="arcface"))]
    assert names == ["d3dfr_res50_nofc.pth", "BFM_model_front.mat", "79999_iter.pth", "antelopev2", "deca_model.tar",
                     "generic_model.pkl", "FLAME_texture.npz", "head_template.obj", "landmark_embedding.npy"]
    with pytest.raises(WeightFileMissing, match="face.weights"):
        preflight(FaceConfig(mask="bisenet"))  # a relative name with no weights folder


# -- BiSeNet -------------------------------------------------------------------------------------------
PUBLISHED_BISENET_KEYS = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer4.1.bn2.running_var": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.weight": (128,),
    "cp.conv_head16.conv.weight": (128, 128, 3, 3),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.running_mean": (64,),
}


@pytest.fixture(scope="module")
def bisenet_state():
    from rigface.face.backends.bisenet import BiSeNet

    torch.manual_seed(1)
    return BiSeNet().state_dict()


def test_bisenet_key_names_match_published_checkpoint(bisenet_state):
    for key, shape in PUBLISHED_BISENET_KEYS.items():
        assert tuple(bisenet_state[key].shape) == shape, key
    assert not any(k.startswith(("cp.resnet.fc", "sp.")) for k in bisenet_state)


def test_bisenet_every_non_background_class_is_head(bisenet_state, tmp_path):
    from rigface.face.backends import make_bisenet

    crop = np.random.default_rng(5).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    torch.save(bisenet_state, tmp_path / "79999_iter.pth")
    masker = make_bisenet(FaceConfig(mask="bisenet", weights=str(tmp_path), bisenet_input_size=128))
    torch.testing.assert_close(masker.net.state_dict()["ffm.conv1.weight"], bisenet_state["ffm.conv1.weight"])
    masks = {}
    for cls in (None, 0, 1, 17):
        if cls is not None:  # the features after ReLU are >= 0: one positive row makes that class win
            with torch.no_grad():
                w = masker.net.conv_out.conv_out.weight
                w.zero_()
                w[cls] = 1.0
        parse = masker.parse(crop)
        assert parse.shape == (96, 96) and parse.max() < 19
        masks[cls] = masker(crop)
        np.testing.assert_array_equal(masks[cls], np.where(parse > 0, 255, 0))
    assert (masks[0] == 0).all()
    assert (masks[1] == 255).all() and (masks[17] == 255).all()
    assert masks[None].dtype == np.uint8 and set(np.unique(masks[None])) <= {0, 255}


def test_bisenet_wrong_checkpoint_is_named(bisenet_state, tmp_path):
    from rigface.face.backends.bisenet import load_bisenet

    state = dict(bisenet_state)
    state["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)  # 18 classes: not the published model
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(WeightFormatError, match=r"conv_out\.conv_out\.weight: file \(18, 256, 1, 1\)"):
        load_bisenet(tmp_path / "x.pth")


# -- wired into FaceAnalyzer ---------------------------------------------------------------------------
def test_analyzer_with_deep3d_expression_and_bisenet_mask(d3d_files, bisenet_state):
    from rigface.face.analyzer import FaceAnalyzer, five_points_from_landmarks
    from rigface.face.types import FaceFit
    import face_media  # tests/ is on pythonpath (pyproject)

    root = d3d_files["root"]
    state = dict(bisenet_state)
    w = torch.zeros_like(state["conv_out.conv_out.weight"])
    w[1] = 1.0  # every pixel parses as skin: the whole crop is head
    state["conv_out.conv_out.weight"] = w
    torch.save(state, root / "79999_iter.pth")
    cfg = FaceConfig(expression="deep3d", mask="bisenet", weights=str(root), bisenet_input_size=128)
    analyzer = FaceAnalyzer(cfg)
    fit = analyzer.analyze(face_media.astronaut())
    analyzer.close()
    assert isinstance(fit, FaceFit), fit
    np.testing.assert_allclose(fit.expression, d3d_files["exp"], atol=1e-5)
    assert fit.backends["expression"] == "deep3d:face_adapter/d3dfr_res50_nofc.pth@256"
    assert fit.backends["mask"] == "bisenet:79999_iter.pth@128"
    assert (fit.mask == 255).all()
    assert fit.scores["deep3d_yaw"] == pytest.approx(math.degrees(0.3), abs=1e-3)
    five = five_points_from_landmarks(fit.landmarks)
    assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]  # image-left first
    assert five[0, 1] < five[2, 1] < five[3, 1]  # eyes above the nose above the mouth


def test_analyzer_names_missing_files_before_loading(tmp_path):
    from rigface.face.analyzer import FaceAnalyzer

    with pytest.raises(WeightFileMissing, match="79999_iter.pth"):
        FaceAnalyzer(FaceConfig(mask="bisenet", weights=str(tmp_path)))
