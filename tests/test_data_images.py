"""Image folders: pixels checked against closed forms (16-bit scaling, luma, alpha over black,
palette look-up), PIL's own 8-bit resampling (resize/crop), and the one label rule."""
import json

import numpy as np
import pytest
from PIL import Image

from dpldm.cli import main
from dpldm.data.errors import SourceError
from dpldm.data.images import ImageOptions, read_images
from dpldm.data.labels import LabelRuleError, class_labels
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import read_shard_arrays
from dpldm.data.sources import load_source


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    im.save(path)
    return path


def _read_folder(folder):
    f = open_shard_folder(folder)
    parts = [read_shard_arrays(f, k, verify="sha256") for k in range(len(f.shards))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), f.manifest


# -- modes ------------------------------------------------------------------------------------------

def test_16bit_ramp_scales_to_8bit_by_closed_form(tmp_path, capsys):
    """A 16-bit PNG ramp over the whole 0..65535 range: v -> round(v / 257), never saturated."""
    ramp = np.linspace(0, 65535, 24 * 24).round().astype(np.uint16).reshape(24, 24)
    for c in ("0", "1"):
        _save(tmp_path / "src" / c / "ramp.png", ramp if c == "0" else ramp[::-1].copy())
    assert Image.open(tmp_path / "src" / "0" / "ramp.png").mode == "I;16"  # really 16-bit on disk
    assert main(["data", "import", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "s")]) == 0
    x, y, manifest = _read_folder(tmp_path / "s")
    want = np.floor(ramp.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # round half up; v/257 is never .5
    np.testing.assert_array_equal(x[0], want)
    np.testing.assert_array_equal(x[1], want[::-1])
    assert x[0].min() == 0 and x[0].max() == 255 and len(np.unique(x[0])) > 200  # the whole range, not white
    assert "16-bit grey scaled by 1/257" in manifest["source_meta"]["images"]["conversion"]
    assert y.tolist() == [0, 1]


def test_mixed_modes_refused_naming_one_file_of_each_then_converted(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=8)  # a palette image
    _save(tmp_path / "d" / "0" / "a.png", grey)
    _save(tmp_path / "d" / "0" / "b.png", grey)
    _save(tmp_path / "d" / "1" / "c.png", rgb)
    pal.save(tmp_path / "d" / "1" / "d.png")
    with pytest.raises(SourceError, match=r"images of different modes \(.*0/a.png is greyscale, .*1/c.png is RGB, "
                                          r".*1/d.png is palette\); pass --mode"):
        load_source(str(tmp_path / "d"), "train")
    x, y, meta = load_source(str(tmp_path / "d"), "train", image_options=ImageOptions(mode="RGB"))
    assert x.shape == (4, 6, 6, 3)
    np.testing.assert_array_equal(x[0], np.repeat(grey[..., None], 3, axis=2))  # grey -> every channel
    np.testing.assert_array_equal(x[2], rgb)
    palette = np.array(pal.getpalette()[:3 * 256], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(x[3], palette[np.asarray(pal)])  # palette look-up by hand
    xl, _, _ = load_source(str(tmp_path / "d"), "train", image_options=ImageOptions(mode="L"))
    luma = lambda a: np.floor(a.astype(np.float64) @ [0.299, 0.587, 0.114] + 0.5)  # noqa: E731
    np.testing.assert_array_equal(xl[2], luma(rgb))
    np.testing.assert_array_equal(xl[3], luma(palette[np.asarray(pal)]))
    np.testing.assert_array_equal(xl[0], grey)


def test_alpha_is_composited_over_black_for_L_and_RGB_and_kept_for_RGBA(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    la = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
    _save(tmp_path / "a" / "x" / "rgba.png", rgba)
    _save(tmp_path / "b" / "x" / "la.png", la, mode="LA")
    with pytest.raises(SourceError, match=r"la.png is a greyscale\+alpha image: pass --mode"):
        load_source(str(tmp_path / "b"), "train")
    x, _, _ = load_source(str(tmp_path / "a"), "train")  # one kind (RGBA): kept without --mode
    np.testing.assert_array_equal(x[0], rgba)
    a = rgba[..., 3:].astype(np.float64) / 255.0
    x, _, _ = load_source(str(tmp_path / "a"), "train", image_options=ImageOptions(mode="RGB"))
    np.testing.assert_array_equal(x[0], np.floor(rgba[..., :3] * a + 0.5))
    x, _, _ = load_source(str(tmp_path / "a"), "train", image_options=ImageOptions(mode="L"))
    np.testing.assert_array_equal(x[0], np.floor((rgba[..., :3] * a) @ [0.299, 0.587, 0.114] + 0.5))
    x, _, _ = load_source(str(tmp_path / "b"), "train", image_options=ImageOptions(mode="L"))
    np.testing.assert_array_equal(x[0], np.floor(la[..., 0] * (la[..., 1] / 255.0) + 0.5))
    x, _, _ = load_source(str(tmp_path / "b"), "train", image_options=ImageOptions(mode="RGBA"))
    np.testing.assert_array_equal(x[0], np.concatenate([np.repeat(la[..., :1], 3, axis=2), la[..., 1:]], axis=2))


def test_unsupported_modes_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(SourceError, match=r"f.tif: image mode 'F' is not supported"):
        read_images([tmp_path / "f.tif"])
    Image.fromarray(np.array([[0, 70000], [1, 2]], np.int32), mode="I").save(tmp_path / "i.tif")
    with pytest.raises(SourceError, match=r"i.tif: I image with values 0..70000 outside 16-bit"):
        read_images([tmp_path / "i.tif"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SourceError, match=r"bad.png: unreadable image"):
        read_images([tmp_path / "bad.png"])


# -- sizes ------------------------------------------------------------------------------------------

def _pil_reference(a: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> np.ndarray:
    """PIL's own 8-bit Lanczos resize (and crop): an independent implementation of the same filter."""
    im = Image.fromarray(a).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im.crop(box) if box else im).astype(np.int64)


def test_resize_shorter_side_and_center_crop_match_pil(tmp_path):
    yy, xx = np.mgrid[0:30, 0:20]
    smooth = (127 + 100 * np.sin(xx / 4.0) * np.cos(yy / 5.0)).round().astype(np.uint8)  # (30, 20): tall
    wide = np.ascontiguousarray(np.stack([smooth.T, smooth.T[::-1], 255 - smooth.T], axis=2))  # (20, 30, 3): wide
    x, notes = read_images([_save(tmp_path / "tall.png", smooth)], ImageOptions(resize=10, center_crop=True))
    assert x.shape == (1, 10, 10) and notes["resize"] == 10
    ref = _pil_reference(smooth, (10, 15), (0, 2, 10, 12))  # 20x30 -> 10x15, centred 10x10: rows 2..11
    assert np.abs(x[0].astype(np.int64) - ref).max() <= 1  # float vs PIL's 8-bit intermediate rounding
    x, _ = read_images([_save(tmp_path / "wide.png", wide)], ImageOptions(mode="RGB", resize=10, center_crop=True))
    ref = _pil_reference(wide, (15, 10), (2, 0, 12, 10))
    assert x.shape == (1, 10, 10, 3) and np.abs(x[0].astype(np.int64) - ref).max() <= 1
    # a constant image stays exactly constant; no resize and no conversion is bit-exact
    x, _ = read_images([_save(tmp_path / "c.png", np.full((9, 13), 77, np.uint8))], ImageOptions(resize=4, center_crop=True))
    assert x.shape == (1, 4, 4) and (x == 77).all()
    x, _ = read_images([tmp_path / "wide.png"])
    np.testing.assert_array_equal(x[0], wide)


def test_size_rules(tmp_path):
    a = _save(tmp_path / "0" / "a.png", np.zeros((8, 8), np.uint8))
    b = _save(tmp_path / "0" / "b.png", np.zeros((6, 9), np.uint8))
    with pytest.raises(SourceError, match=r"different sizes \(.*a.png is 8x8, .*b.png is 9x6\); pass --resize"):
        read_images([a, b])
    with pytest.raises(SourceError, match=r"b.png: 9x6 is not square, so --resize 4 makes it 6x4; add --center-crop"):
        read_images([a, b], ImageOptions(resize=4))
    x, _ = read_images([a, b], ImageOptions(resize=4, center_crop=True))
    assert x.shape == (2, 4, 4)
    x, _ = read_images([b], ImageOptions(center_crop=True))  # crop alone: the centred square of the shorter side
    assert x.shape == (1, 6, 6)
    with pytest.raises(SourceError, match="--resize must be an integer >= 1"):
        ImageOptions(resize=0)


# -- labels -----------------------------------------------------------------------------------------

def test_label_rule():
    r = class_labels(["10", "2", "0", "1"])
    assert r.rule == "integer" and r.class_to_label == {"0": 0, "1": 1, "2": 2, "10": 10} and r.num_classes == 11
    assert r.folders == ["0", "1", "2", "10"]  # numeric order, not "0", "1", "10", "2"
    r = class_labels(["dog", "cat", "10"[::-1] + "x"])
    assert r.rule == "sorted-names" and r.class_to_label == {"01x": 0, "cat": 1, "dog": 2}
    with pytest.raises(LabelRuleError, match=r"mix integer names \('3'\) and other names \('cat'\)"):
        class_labels(["3", "cat"])
    with pytest.raises(LabelRuleError, match=r"'7' and '07' are the same label 7"):
        class_labels(["7", "07"])
    assert class_labels(["-1", "x"]).rule == "sorted-names"  # "-1" is a name, not an integer


def test_numeric_class_folders_import_with_integer_labels(tmp_path):
    rng = np.random.default_rng(2)
    for c in (0, 1, 2, 10, 11):
        for j in range(2):
            _save(tmp_path / "src" / str(c) / f"{j}.png", np.full((4, 4), 10 * c + j, np.uint8))
    assert main(["data", "import", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "s")]) == 0
    x, y, manifest = _read_folder(tmp_path / "s")
    assert (x[:, 0, 0] // 10).tolist() == y.tolist()  # every image carries its folder's number
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 10, 10, 11, 11]
    assert manifest["num_classes"] == 12 and manifest["class_histogram"][10] == 2
    meta = manifest["source_meta"]
    assert meta["label_rule"] == "integer" and meta["class_to_label"]["10"] == 10
    assert "sorted numerically" in meta["label_rule_text"]
    # a folder of names: the name -> label map is saved in the manifest
    for name in ("zebra", "ant"):
        _save(tmp_path / "named" / name / "a.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    assert main(["data", "import", "--source", str(tmp_path / "named"), "--out", str(tmp_path / "n")]) == 0
    m = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert m["source_meta"]["class_to_label"] == {"ant": 0, "zebra": 1} and m["class_names"] == ["ant", "zebra"]


def test_image_beside_class_folders_is_refused(tmp_path):
    _save(tmp_path / "src" / "0" / "a.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "src" / "stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(SourceError, match=r"stray.png: an image directly in the folder"):
        load_source(str(tmp_path / "src"), "train")
