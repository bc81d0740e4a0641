"""The public glyph set: reproducible, fast, MNIST-like, and labels match the drawn characters."""
import time

import numpy as np
import pytest
import torch

from dpldm.data.glyphs import CLASSES, font_paths, glyph_templates, render_glyphs


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def big():
    torch.set_num_threads(1)
    t0 = time.process_time()  # CPU seconds: robust to a busy machine
    images, labels = render_glyphs(20_000, seed=3)
    return images, labels, time.process_time() - t0


def test_classes_and_fonts():
    assert "".join(CLASSES) == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    paths = font_paths()
    assert len(paths) == 12 and all(p.is_file() and p.name.startswith("DejaVu") for p in paths)
    assert all("mpl-data" in str(p) for p in paths)
    t = glyph_templates(64)
    assert t.shape == (12 * 36, 4, 64, 64)
    ink = t.sum(dim=(2, 3))  # (F*36, 4): thin < regular < bold < bolder
    assert bool((ink[:, 0] < ink[:, 1]).all() and (ink[:, 1] < ink[:, 2]).all() and (ink[:, 2] < ink[:, 3]).all())


def test_twenty_thousand_fast_and_well_formed(big):
    images, labels, seconds = big
    assert seconds < 30.0, f"20k glyphs took {seconds:.1f} CPU seconds on one thread"
    assert images.shape == (20_000, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (20_000,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=36)
    assert counts.min() > 0.8 * 20_000 / 36 and counts.max() < 1.2 * 20_000 / 36
    # white glyph on black, like MNIST: dark border, bright strokes, most pixels black
    border = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(), images[:, :, :2].ravel(), images[:, :, -2:].ravel()])
    assert border.mean() < 5
    assert (images.reshape(20_000, -1).max(axis=1) > 200).mean() > 0.99
    assert 0.05 < (images > 127).mean() < 0.35


def test_same_seed_same_bytes_other_seed_differs():
    a, la = render_glyphs(300, seed=11)
    torch.set_num_threads(2)
    b, lb = render_glyphs(300, seed=11)
    torch.set_num_threads(1)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    c, _ = render_glyphs(300, seed=12)
    assert a.tobytes() != c.tobytes()
    head, lh = render_glyphs(10, seed=11, size=32)
    assert head.shape == (10, 32, 32) and render_glyphs(4, seed=0, size=16)[0].shape == (4, 16, 16)
    with pytest.raises(ValueError):
        render_glyphs(3, seed=0, size=15)


def nearest_centroid_accuracy(x_train, y_train, x_test, y_test) -> float:
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(36)])  # (36, D)
    d = (x_test ** 2).sum(1)[:, None] - 2 * x_test @ centroids.T + (centroids ** 2).sum(1)[None]  # (N, 36)
    return float((d.argmin(axis=1) == y_test).mean())


def test_labels_match_the_drawn_characters(big):
    """A nearest-centroid classifier fitted on one seed recognises another seed's glyphs far
    above chance (1/36); with labels detached from the images it sits near chance."""
    images, labels, _ = big
    x_train = images[:10_000].reshape(10_000, -1).astype(np.float32) / 255
    test_images, test_labels = render_glyphs(2_000, seed=4)
    x_test = test_images.reshape(2_000, -1).astype(np.float32) / 255
    acc = nearest_centroid_accuracy(x_train, labels[:10_000], x_test, test_labels)
    assert acc > 0.4, acc
    shuffled = np.random.default_rng(0).permutation(labels[:10_000])
    assert nearest_centroid_accuracy(x_train, shuffled, x_test, test_labels) < 0.1
