"""Fidelity statistics against direct computations: scipy's sqrtm, brute-force kernels and k-NN balls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from sklearn.metrics import roc_auc_score

from bench.metrics import fidelity as F


def _fid_sqrtm(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_matches_sqrtm_on_known_gaussians():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            _fid_sqrtm(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9
        )


def test_frechet_closed_forms():
    d = 8
    # Same covariance: only the mean term is left. Isotropic covariances a^2 I and b^2 I: d (a - b)^2.
    mu = np.arange(d, dtype=float)
    assert F.frechet_distance(mu, np.eye(d), mu + 2, np.eye(d)) == pytest.approx(4 * d)
    assert F.frechet_distance(mu, 4 * np.eye(d), mu, 9 * np.eye(d)) == pytest.approx(d * (2 - 3) ** 2)
    assert F.frechet_distance(mu, np.eye(d), mu, np.eye(d)) == pytest.approx(0, abs=1e-10)


def test_frechet_features_samples_and_interval():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4)) * 2 + 1
    # Population distance: ||1||^2 * 4 + 4 * (1 - 2)^2 = 8.
    est = F.frechet_features(a, b, n_boot=50, seed=0)
    assert est.value == pytest.approx(8.0, rel=0.1)
    assert est.ci_low < est.value < est.ci_high
    same = np.cov(a, rowvar=False)
    assert est.value == pytest.approx(
        _fid_sqrtm(a.mean(0), same, b.mean(0), np.cov(b, rowvar=False)), rel=1e-8
    )


def _mmd_brute(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def test_mmd_matches_brute_force_across_tiles():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(70, 6)), rng.normal(size=(53, 6)) + 0.3
    ref = _mmd_brute(x, y)
    for tile in (7, 16, 4096):
        assert F.mmd2_unbiased(x, y, tile=tile) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_kid_subsets_and_interval():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 5)), rng.normal(size=(200, 5))
    est, sd, size = F.kid(x, y, n_subsets=20, subset_size=50, seed=0)
    assert size == 50
    # The same subsets, drawn the same way, scored by brute force.
    r = np.random.default_rng(0)
    vals = [
        _mmd_brute(x[r.choice(300, 50, replace=False)], y[r.choice(200, 50, replace=False)])
        for _ in range(20)
    ]
    assert est.value == pytest.approx(np.mean(vals), rel=1e-4, abs=1e-7)
    assert sd == pytest.approx(np.std(vals, ddof=1), rel=1e-3)
    assert est.ci_low == pytest.approx(np.percentile(vals, 2.5), rel=1e-3, abs=1e-7)
    # Same distribution: unbiased, so near zero; a shifted one is clearly positive.
    far, _, _ = F.kid(x, y + 1.0, n_subsets=20, subset_size=50, seed=0)
    assert abs(est.value) < 0.05 < far.value


def _prdc_brute(real, fake, k):
    drr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    dff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    drf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    rr = np.sort(drr, axis=1)[:, k]
    rf = np.sort(dff, axis=1)[:, k]
    inside = drf <= rr[:, None]  # [real, fake]
    return {
        "precision": inside.any(0).mean(),
        "recall": (drf <= rf[None, :]).any(1).mean(),
        "density": inside.sum(0).mean() / k,
        "coverage": inside.any(1).mean(),
    }, rr


@pytest.mark.parametrize("tile", [5, 17, 4096])
def test_prdc_matches_brute_force(tile):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(90, 3))
    fake = rng.normal(size=(60, 3)) * 1.3 + 0.4
    ref, rr = _prdc_brute(real, fake, 5)
    got = F.prdc(real, fake, 5, tile=tile, n_boot=100)
    for name, v in ref.items():
        assert got[name].value == pytest.approx(v, abs=1e-12), name
        assert got[name].ci_low <= v <= got[name].ci_high
    np.testing.assert_allclose(F.knn_radii(real, 5, tile=tile), rr, rtol=1e-4)


def test_prdc_copies_and_far_sets():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 16))
    got = F.prdc(real, real.copy(), 5)
    assert got["precision"].value == 1 and got["recall"].value == 1 and got["coverage"].value == 1
    assert got["density"].value == pytest.approx(1.0, abs=0.2)
    far = F.prdc(real, real + 100, 5)
    assert far["precision"].value == 0 and far["coverage"].value == 0 and far["density"].value == 0


def test_spread_is_rms_pairwise_distance():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 7))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    rms = np.sqrt(d2[~np.eye(40, dtype=bool)].mean())
    assert F.spread(x) == pytest.approx(rms, rel=1e-10)
    est, sr, ss = F.spread_ratio(x, 0.5 * x, n_boot=100)
    assert est.value == pytest.approx(0.5) and ss == pytest.approx(0.5 * sr)
    assert est.ci_low <= 0.5 <= est.ci_high


def test_near_duplicates():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(300, 8))
    fresh = rng.normal(size=(300, 8))
    dup = np.repeat(real[:150], 2, axis=0)  # every image twice
    est, thr, size = F.near_duplicate_rate(real, dup, n_boot=100)
    assert est.value == 1.0 and size == 300 and thr > 0
    est2, _, _ = F.near_duplicate_rate(real, fresh)
    assert est2.value < 0.05
    brute = np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, 1]
    assert thr == pytest.approx(np.percentile(brute, 1.0), rel=1e-4)


def test_label_fidelity_against_sklearn():
    rng = np.random.default_rng(8)
    n, k = 400, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = F.label_fidelity(y, p, k, n_boot=200, seed=0)
    assert got["accuracy"].value == pytest.approx((p.argmax(1) == y).mean())
    assert got["auroc"].value == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for c in range(k):
        assert got["class_auroc"][c].value == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert got["class_accuracy"][c].value == pytest.approx((p.argmax(1) == y)[y == c].mean())
    assert got["auroc"].ci_low < got["auroc"].value < got["auroc"].ci_high
    # Shuffled labels: chance.
    shuffled = F.label_fidelity(rng.permutation(y), p, k, n_boot=200)
    assert abs(shuffled["auroc"].value - 0.5) < 0.08 and abs(shuffled["accuracy"].value - 1 / k) < 0.08


def test_rank_correlation():
    from scipy.stats import spearmanr

    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0])
    got = F.rank_correlation(x, y, n_boot=500)
    assert got["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert got["ci_low"] <= got["rho"] <= got["ci_high"] <= 1
    assert got["n"] == 6 and 0 < got["n_boot_used"] <= 500
    assert F.rank_correlation([1, 2], [1, 2])["rho"] is None


def test_frechet_few_images_many_dimensions_matches_covariance_route():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(20, 50)), rng.normal(size=(30, 50)) + 0.2
    ref = _fid_sqrtm(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert F.frechet_features(a, b).value == pytest.approx(ref, rel=1e-6)


def test_frechet_interval_covers_zero_for_identical_sets():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(80, 6))
    est = F.frechet_features(a, a.copy(), n_boot=50)
    assert est.value == pytest.approx(0, abs=1e-9) and est.ci_low == 0.0 and est.ci_high > 0
