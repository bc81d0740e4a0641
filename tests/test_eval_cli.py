"""`dpldm evaluate`: input loading and clear errors (no Inception here: --no-fid or errors first)."""
import json

import numpy as np
import pytest
from PIL import Image

from dpldm.cli import main as dpldm_main
from dpldm.data.errors import SourceError
from dpldm.errors import UserError
from dpldm.eval.cli import load_images


def _toy(n=90, size=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    band = size // classes
    for i, c in enumerate(y):
        x[i, c * band:(c + 1) * band] = 220
    return x, y


def _run(capsys, *argv):
    rc = dpldm_main(["evaluate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def files(tmp_path):
    x, y = _toy()
    xt, yt = _toy(30, seed=1)
    np.savez(tmp_path / "samples.npz", images=x, labels=y)
    np.savez(tmp_path / "test.npz", images=xt, labels=yt)
    np.savez(tmp_path / "real.npz", images=xt)
    return tmp_path


def test_downstream_only_end_to_end_with_json(files, capsys):
    out_json = files / "report" / "eval.json"
    rc, out, err = _run(capsys, "--samples", str(files / "samples.npz"), "--real-test",
                        str(files / "test.npz"), "--no-fid", "--classifier-epochs", "2",
                        "--json", str(out_json))
    assert rc == 0, err
    assert "accuracy" in out and "30 real test images" in out
    report = json.loads(out_json.read_text())
    assert report["n_test_real"] == 30 and report["n_train_synthetic"] + report["n_val_synthetic"] == 90
    assert 0 <= report["accuracy"] <= 1 and "fid" not in report


def test_png_folder_with_class_subfolders(tmp_path):
    x, y = _toy(12)
    for i, (img, label) in enumerate(zip(x, y)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / str(label) / f"{i:03d}.png")
    images, labels = load_images(str(tmp_path), "--samples")
    assert images.shape == (12, 16, 16) and images.dtype == np.uint8
    order = np.argsort([f"{l}/{i:03d}" for i, l in enumerate(y)], kind="stable")
    assert np.array_equal(labels, y[order]) and np.array_equal(images, x[order])
    # flat folder: images without labels
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(x[0]).save(flat / "a.png")
    Image.fromarray(np.stack([x[1]] * 3, -1)).save(flat / "b.png")  # RGB of another mode
    with pytest.raises(UserError, match=r"different modes \(.*a.png is greyscale, .*b.png is RGB\)"):
        load_images(str(flat), "--samples")
    images, labels = load_images(str(flat), "--samples", mode="L")  # explicit: both converted to L
    assert labels is None and images.shape == (2, 16, 16)
    np.testing.assert_array_equal(images[0], x[0])
    np.testing.assert_array_equal(images[1], x[1])  # grey stored as RGB: luma of (v, v, v) is v


def test_png_folder_labels_follow_the_import_rule(tmp_path):
    """The same folder gives the same (image, label) pairs to `evaluate` as to `data import`:
    integer names are labels (10 stays 10, not 2 as text sorting would make it)."""
    from dpldm.data.sources import load_source

    rng = np.random.default_rng(3)
    want = {}
    for c in (2, 10, 1):
        (tmp_path / "ints" / str(c)).mkdir(parents=True)
        for j in range(2):
            a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "ints" / str(c) / f"{j}.png")
            want[a.tobytes()] = c
    images, labels = load_images(str(tmp_path / "ints"), "--samples")
    assert sorted(labels.tolist()) == [1, 1, 2, 2, 10, 10]
    assert all(want[img.tobytes()] == lab for img, lab in zip(images, labels))
    xi, yi, meta = load_source(str(tmp_path / "ints"), "train")
    assert {a.tobytes(): int(b) for a, b in zip(xi, yi)} == {a.tobytes(): int(b) for a, b in zip(images, labels)}
    assert meta["num_classes"] == 11 and meta["label_rule"] == "integer"
    # non-integer names: sorted names -> 0..K-1, the same map as the import
    for name in ("dog", "cat"):
        (tmp_path / "names" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), len(name) * 10 + ord(name[0]) % 7, np.uint8)).save(tmp_path / "names" / name / "a.png")
    images, labels = load_images(str(tmp_path / "names"), "--samples")
    _, yn, meta = load_source(str(tmp_path / "names"), "train")
    assert meta["class_to_label"] == {"cat": 0, "dog": 1} and sorted(labels.tolist()) == sorted(yn.tolist()) == [0, 1]
    # a mix of integer and other names is refused by both
    (tmp_path / "ints" / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ints" / "cat" / "a.png")
    with pytest.raises(UserError, match=r"mix integer names \('1'\) and other names \('cat'\)"):
        load_images(str(tmp_path / "ints"), "--samples")
    with pytest.raises(SourceError, match=r"mix integer names"):
        load_source(str(tmp_path / "ints"), "train")


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("wrong_shape", "shape"),
    ("no_images_key", "no 'images' array"),
    ("float_images", "uint8"),
    ("label_count", "labels"),
    ("test_label_out_of_range", "out of range"),
    ("negative_label", "out of range"),
    ("not_npz", "neither"),
    ("empty_folder", "no PNG"),
])
def test_bad_inputs_give_clear_errors(files, capsys, case, match):
    x, y = _toy()
    samples, test = files / "samples.npz", files / "test.npz"
    if case == "missing":
        samples = files / "nope.npz"
    elif case == "wrong_shape":
        np.savez(samples, images=x.reshape(len(x), -1), labels=y)
    elif case == "no_images_key":
        np.savez(samples, x=x, labels=y)
    elif case == "float_images":
        np.savez(samples, images=x.astype(np.float32), labels=y)
    elif case == "label_count":
        np.savez(samples, images=x, labels=y[:-3])
    elif case == "test_label_out_of_range":
        xt, yt = _toy(30, seed=1)
        yt[4] = 7  # synthetic labels are 0..2
        np.savez(test, images=xt, labels=yt)
    elif case == "negative_label":
        y = y.copy()
        y[0] = -1
        np.savez(samples, images=x, labels=y)
    elif case == "not_npz":
        samples = files / "samples.txt"
        samples.write_text("hello")
    elif case == "empty_folder":
        samples = files / "empty"
        samples.mkdir()
    rc, out, err = _run(capsys, "--samples", str(samples), "--real-test", str(test), "--no-fid")
    assert rc == 2
    assert err.startswith("dpldm evaluate: error:") and len(err.strip().splitlines()) == 1
    assert match in err, err


def test_argument_errors(files, capsys):
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"))
    assert rc == 2 and "--real" in err
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"), "--no-fid")
    assert rc == 2 and "nothing to do" in err
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"), "--real", str(files / "real.npz"),
                      "--fid-samples", "1")
    assert rc == 2 and "--fid-samples" in err
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"), "--real", str(files / "real.npz"),
                      "--full", "--fid-samples", "10")
    assert rc == 2 and "--full" in err
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"), "--real-test",
                      str(files / "real.npz"), "--no-fid")
    assert rc == 2 and "labels" in err
    rc, _, err = _run(capsys, "--samples", str(files / "samples.npz"), "--real", str(files / "real.npz"),
                      "--device", "tpu")
    assert rc == 2 and "device" in err
