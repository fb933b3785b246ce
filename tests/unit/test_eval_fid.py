"""FID: Frechet distance on closed-form cases, mergeable statistics, and the shipped InceptionV3 end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import special_ortho_group
from skimage import data as skdata

from rigface.eval.fid import (
    FeatureStats,
    FIDError,
    InceptionFeatures,
    fid_from_stats,
    frechet_distance,
    frechet_distance_samples,
    nv_bilinear,
)


def test_frechet_closed_form_1d():
    # N(0, 1) vs N(m, s^2): m^2 + 1 + s^2 - 2 s
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(9 + 1 + 4 - 4)


def test_frechet_closed_form_rotated_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 6
    rot = special_ortho_group.rvs(d, random_state=1)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    s1, s2 = rot @ np.diag(a) @ rot.T, rot @ np.diag(b) @ rot.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_singular_and_mismatched():
    s = np.diag([1.0, 0.0])  # singular: the eps offset path must still give a finite value
    assert frechet_distance([0, 0], s, [1, 0], s) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(FIDError):
        frechet_distance([0, 0], np.eye(2), [0, 0, 0], np.eye(3))


def test_feature_stats_match_numpy_and_merge():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 8))
    whole = FeatureStats(dim=8).update(f)
    parts = FeatureStats(dim=8).update(f[:15]).merge(FeatureStats(dim=8).update(f[15:]))
    for stats in (whole, parts):
        mu, cov = stats.mean_cov()
        np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)  # kept as float32
        np.testing.assert_allclose(cov, np.cov(f, rowvar=False), atol=1e-5)
    with pytest.raises(FIDError):
        FeatureStats(dim=8).update(f[:1]).mean_cov()
    with pytest.raises(FIDError):
        FeatureStats(dim=8).update(rng.normal(size=(3, 5)))


@pytest.mark.parametrize("n1,n2", [(20, 30), (200, 150)])
def test_fid_sample_form_equals_sqrtm_form(n1, n2):
    """The exact low-rank form (few samples) and the scipy.linalg.sqrtm form agree."""
    rng = np.random.default_rng(n1)
    d = 64
    fa = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) * 0.3
    fb = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    a, b = FeatureStats(dim=d).update(fa), FeatureStats(dim=d).update(fb)
    via_sqrtm = frechet_distance(*a.mean_cov(), *b.mean_cov())
    assert frechet_distance_samples(a.features(), b.features()) == pytest.approx(via_sqrtm, rel=1e-6)
    assert fid_from_stats(a, b) == pytest.approx(via_sqrtm, rel=1e-6)
    assert fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-6)


def test_nv_bilinear_keeps_constant_and_same_size():
    x = torch.rand(1, 3, 40, 50)
    torch.testing.assert_close(nv_bilinear(x, (40, 50)), x, atol=1e-5, rtol=0)
    const = torch.full((1, 3, 64, 64), 0.25)
    torch.testing.assert_close(nv_bilinear(const, (299, 299)), torch.full((1, 3, 299, 299), 0.25))


def _face_set(n: int = 6, size: int = 96) -> np.ndarray:
    """Crops of scikit-image's sample photographs (the astronaut portrait, a cat, coffee ...)."""
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        out.append(p[y:y + size, x:x + size])
    return np.stack(out).astype(np.float32) / 255


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_inception_fid_self_zero_and_monotone_in_noise(inception):
    imgs = _face_set()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=imgs.shape).astype(np.float32)

    def stats(x):
        t = torch.from_numpy(np.clip(x, 0, 1)).permute(0, 3, 1, 2).contiguous()
        feats = inception(t).numpy()
        assert feats.shape == (len(x), 2048) and np.isfinite(feats).all()
        return FeatureStats().update(feats)

    ref = stats(imgs)
    assert fid_from_stats(ref, ref) == pytest.approx(0.0, abs=1e-3)
    fids = [fid_from_stats(ref, stats(imgs + s * noise)) for s in (0.05, 0.2)]
    assert 0 < fids[0] < fids[1], fids


def test_inception_bad_path(tmp_path):
    with pytest.raises(FIDError):
        InceptionFeatures(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(FIDError):
        InceptionFeatures(bad)
