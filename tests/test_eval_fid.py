"""FID / KID formulas on synthetic feature vectors (no Inception: fast)."""
import numpy as np
import pytest

from dpldm.cli import UserError
from dpldm.eval import fid as fidlib
from dpldm.eval.fid import (FeatureStats, fid_from_features, frechet_distance,
                            kernel_inception_distance, mmd2_unbiased)


def _closed_form_diag(mu1, var1, mu2, var2):
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_two_diagonal_gaussians_matches_closed_form(method):
    rng = np.random.default_rng(1)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), method=method)
    assert got == pytest.approx(_closed_form_diag(mu1, var1, mu2, var2), rel=1e-9, abs=1e-9)
    # same distribution -> 0; pure mean shift -> squared distance
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1), method=method) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu1, np.diag(var1), mu1 + 2.0, np.diag(var1), method=method) == pytest.approx(4.0 * d)


def test_fid_full_covariance_closed_form_when_commuting():
    # S2 = S1^2 commute: Tr((S1 S2)^{1/2}) = Tr(S1^{3/2}).
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    ev = rng.uniform(0.2, 2.0, 16)
    s1 = (q * ev) @ q.T
    s2 = (q * ev ** 2) @ q.T
    want = float(ev.sum() + (ev ** 2).sum() - 2 * (ev ** 1.5).sum())
    assert frechet_distance(np.zeros(16), s1, np.zeros(16), s2) == pytest.approx(want, rel=1e-9)


def test_fid_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1, 2, 3]), np.array([0.5, 1, 1, 3])
    var1, var2 = np.array([1.0, 2, 0.5, 1]), np.array([1.0, 0.5, 0.5, 3])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(var1)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(var2)
    got = fid_from_features(x, y)
    assert got.n_samples == n and got.n_real == n
    assert got.value == pytest.approx(_closed_form_diag(mu1, var1, mu2, var2), rel=0.02)


@pytest.mark.parametrize("n1,n2,d", [(40, 30, 128), (300, 250, 48)])
def test_fid_methods_agree_and_self_fid_is_zero(n1, n2, d):
    """The sample-space SVD form equals sqrtm (the reference) and eigh, also when n < d."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n1, d)) * rng.uniform(0.5, 2, d) + rng.uniform(0, 1, d)
    y = rng.normal(size=(n2, d)) * 0.7 + rng.uniform(0, 1, d)
    vals = {m: fid_from_features(x, y, method=m).value for m in ("svd", "sqrtm", "eigh")}
    assert vals["svd"] == pytest.approx(vals["sqrtm"], rel=1e-6)
    assert vals["eigh"] == pytest.approx(vals["sqrtm"], rel=1e-6)
    assert fid_from_features(x, y).value == pytest.approx(vals["sqrtm"], rel=1e-6)  # auto
    scale = vals["sqrtm"]
    for m in ("svd", "sqrtm", "eigh"):  # singular covariance when n < d: the sqrtm fix path
        assert abs(fid_from_features(x, x, method=m).value) < 1e-6 * scale


def test_fid_result_reports_sample_counts(tmp_path):
    rng = np.random.default_rng(5)
    r = fid_from_features(rng.normal(size=(12, 8)), rng.normal(size=(20, 8)))
    assert (r.n_samples, r.n_real) == (12, 20)
    assert "n=12" in str(r) and "20 real" in str(r)
    assert r.as_dict()["fid_n_samples"] == 12
    stats = FeatureStats.from_features(rng.normal(size=(20, 8)))
    stats.save(tmp_path / "s.npz", model_sha1="abc")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 20 and np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)


def _kid_direct(x, y):
    """O(n^2) double loop: unbiased MMD^2, k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_direct_computation(monkeypatch):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(25, 16)) + 0.3
    y = rng.normal(size=(25, 16))
    direct = _kid_direct(x, y)
    assert mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    # one subset of all 25: the full-set estimator (it is permutation invariant)
    r = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=1000)
    assert r.subset_size == 25 and r.mean == pytest.approx(direct, rel=1e-10) and r.std == 0
    # subsets smaller than the sets: same draws as clean-fid (x subset, then y subset)
    big_x, big_y = rng.normal(size=(60, 16)) + 0.3, rng.normal(size=(50, 16))
    r = kernel_inception_distance(big_x, big_y, num_subsets=3, max_subset_size=20, seed=7)
    g = np.random.default_rng(7)
    want = []
    for _ in range(3):
        ix, iy = g.choice(60, 20, replace=False), g.choice(50, 20, replace=False)
        want.append(_kid_direct(big_x[ix], big_y[iy]))
    assert r.mean == pytest.approx(np.mean(want), rel=1e-10)
    assert r.std == pytest.approx(np.std(want), rel=1e-8)
    # the precomputed-Gram path and the per-subset path agree
    monkeypatch.setattr(fidlib, "_KID_GRAM_LIMIT", 0)
    r2 = kernel_inception_distance(big_x, big_y, num_subsets=3, max_subset_size=20, seed=7)
    assert r2.mean == pytest.approx(r.mean, rel=1e-12)


def test_kid_subsets_are_smaller_than_the_sets():
    """500 vs 500 with 100 subsets: subsets of 250 (not all 500, whose spread would read 0), and
    the mean and spread equal a direct loop over the same draws."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(500, 8)) + 0.2, rng.normal(size=(500, 8))
    r = kernel_inception_distance(x, y, num_subsets=100, max_subset_size=1000, seed=3)
    assert r.subset_size == 250 and r.num_subsets == 100
    g = np.random.default_rng(3)
    want = []
    for _ in range(100):
        ix, iy = g.choice(500, 250, replace=False), g.choice(500, 250, replace=False)
        want.append(mmd2_unbiased(x[ix], y[iy]))
    assert r.mean == pytest.approx(np.mean(want), rel=1e-10)
    assert r.std == pytest.approx(np.std(want), rel=1e-8) and r.std > 0
    # a set smaller than max_subset_size on one side only: the smaller side is halved
    r = kernel_inception_distance(x[:300], y, num_subsets=5, max_subset_size=1000)
    assert r.subset_size == 150


def test_kid_identical_and_same_distribution_near_zero():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(400, 32))
    y = rng.normal(size=(400, 32))
    shifted = rng.normal(size=(400, 32)) + 0.5
    far = kernel_inception_distance(x, shifted, num_subsets=20, max_subset_size=200).mean
    same = kernel_inception_distance(x, x, num_subsets=20, max_subset_size=200)
    iid = kernel_inception_distance(x, y, num_subsets=20, max_subset_size=200)
    assert far > 0.05
    assert abs(iid.mean) < 0.02 * far and iid.std > 0
    # Identical sets: subsets drawn independently from one set share points, and a shared point
    # adds k(x, x) to the cross term; the estimate is then the (slightly negative) full-set
    # value -2 (mean k(x,x) - mean_{i!=j} k(x_i,x_j)) / n, tiny next to a real difference.
    assert abs(same.mean) < 0.05 * far
    full = mmd2_unbiased(x, x)
    assert full < 0 and same.mean == pytest.approx(full, abs=3 * same.std)


def test_bad_features_are_clear_errors():
    rng = np.random.default_rng(9)
    with pytest.raises(UserError, match="feature sizes differ"):
        fid_from_features(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))
    bad = rng.normal(size=(5, 4))
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        fid_from_features(bad, rng.normal(size=(5, 4)))
    with pytest.raises(UserError, match="at least 2"):
        fid_from_features(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(UserError, match="shape"):
        kernel_inception_distance(rng.normal(size=(5,)), rng.normal(size=(5, 4)))
