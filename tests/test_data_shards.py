"""Import into webdataset shards: bit-exact round trips, manifest/index contents, restartability, CLI."""
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dpldm.data.errors import SourceError
from dpldm.data.loaders import PrivateIndexedDataset
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import import_arrays, iter_shard
from dpldm.data.testing import indexed_images

REPO = Path(__file__).resolve().parents[1]


def _read_all(folder):
    f = open_shard_folder(folder)
    xs, ys = [], []
    for k in range(len(f.shards)):
        for i, x, y in iter_shard(f, k, verify="sha256"):
            assert i == len(xs)
            xs.append(x)
            ys.append(y)
    return np.stack(xs), np.array(ys)


@pytest.mark.parametrize("fmt", ["npy", "png"])
@pytest.mark.parametrize("shape", [(8, 8), (5, 7, 3), (6, 6, 4), (4, 4, 1)])
def test_round_trip_bit_exact(tmp_path, fmt, shape):
    images, labels, meta = indexed_images(23, shape, num_classes=4)
    report = import_arrays(images, labels, meta, tmp_path / "s", shard_size=10, fmt=fmt)
    assert report.written == [0, 1, 2] and report.skipped == []
    xs, ys = _read_all(tmp_path / "s")  # sequential, through webdataset
    assert xs.dtype == np.uint8 and xs.shape == images.shape
    np.testing.assert_array_equal(xs, images)
    np.testing.assert_array_equal(ys, labels)
    ds = PrivateIndexedDataset(tmp_path / "s")  # random access, through wids
    for i in (0, 9, 10, 22):
        x, y = ds.get(i)
        np.testing.assert_array_equal(x, images[i])
        assert y == labels[i]
    ds.close()


def test_manifest_and_wids_index(tmp_path):
    import wids

    images, labels, meta = indexed_images(25, (4, 4), num_classes=3)
    m = import_arrays(images, labels, meta, tmp_path / "s", shard_size=10, fmt="npy").manifest
    assert m["num_examples"] == 25 and m["split"] == "train" and m["source"] == "indexed"
    assert m["class_histogram"] == np.bincount(labels).tolist() == [9, 8, 8]
    assert m["image_shape"] == [4, 4] and m["image_dtype"] == "uint8" and m["sample"]["ext"] == "npy"
    for s in m["shards"]:
        data = (tmp_path / "s" / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["filesize"] == len(data)
    assert [s["nsamples"] for s in m["shards"]] == [10, 10, 5]
    assert not list((tmp_path / "s").glob(".*"))  # no temporary or progress files left
    # the index is the shard-list JSON wids itself reads
    ds = wids.ShardListDataset(str(tmp_path / "s" / "index.json"), cache_dir=str(tmp_path / "cache"),
                               transformations=[])
    assert len(ds) == 25
    s = ds[17]
    assert s["__key__"] == "00000017" and int(s[".cls"].read()) == labels[17]
    np.testing.assert_array_equal(np.load(s[".npy"]), images[17])
    ds.close()


def test_shards_are_deterministic(tmp_path):
    images, labels, meta = indexed_images(12, (4, 4))
    a = import_arrays(images, labels, meta, tmp_path / "a", shard_size=5).manifest
    b = import_arrays(images, labels, meta, tmp_path / "b", shard_size=5).manifest
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_interrupted_import_restarts(tmp_path):
    images, labels, meta = indexed_images(50, (6, 6))
    out = tmp_path / "s"

    class Stop(Exception):
        pass

    def stop_after_two(k):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        import_arrays(images, labels, meta, out, shard_size=10, on_shard=stop_after_two)
    assert not (out / "manifest.json").exists() and not (out / "index.json").exists()
    with pytest.raises(Exception, match="incomplete"):
        open_shard_folder(out)
    kept = {k: (out / f"shard-00000{k}.tar").stat().st_mtime_ns for k in (0, 1)}
    (out / ".shard-000002.tar.abc123.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:700])  # damaged since
    report = import_arrays(images, labels, meta, out, shard_size=10)
    assert report.skipped == [0] and report.written == [1, 2, 3, 4]
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept[0]
    assert not (out / ".shard-000002.tar.abc123.tmp").exists()
    xs, ys = _read_all(out)
    np.testing.assert_array_equal(xs, images)
    np.testing.assert_array_equal(ys, labels)
    again = import_arrays(images, labels, meta, out, shard_size=10)  # complete folder: nothing to do
    assert again.written == [] and again.skipped == [0, 1, 2, 3, 4]


def test_killed_import_process_restarts(tmp_path):
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal
        from dpldm.data.shards import import_arrays
        from dpldm.data.testing import indexed_images
        images, labels, meta = indexed_images(40, (6, 6))
        def kill(k):
            if k == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        import_arrays(images, labels, meta, {str(out)!r}, shard_size=10, on_shard=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (out / "manifest.json").exists()
    images, labels, meta = indexed_images(40, (6, 6))
    report = import_arrays(images, labels, meta, out, shard_size=10)
    assert report.skipped == [0, 1] and report.written == [2, 3]
    np.testing.assert_array_equal(_read_all(out)[0], images)


def test_other_dataset_in_folder_is_refused(tmp_path):
    images, labels, meta = indexed_images(20, (4, 4))
    out = tmp_path / "s"
    import_arrays(images, labels, meta, out, shard_size=10)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = indexed_images(20, (4, 4), seed=1)
    with pytest.raises(SourceError, match="already holds a different dataset"):
        import_arrays(*other, out, shard_size=10)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    import_arrays(*other, out, shard_size=7, overwrite=True)
    np.testing.assert_array_equal(_read_all(out)[0], other[0])
    assert len(list(out.glob("shard-*.tar"))) == 3


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpldm", "data", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_import_and_inspect(tmp_path):
    from PIL import Image

    images, labels, meta = indexed_images(30, (8, 8), num_classes=3)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    r = _cli("import", "--source", str(tmp_path / "d.npz"), "--out", str(tmp_path / "s"), "--shard-size", "8",
             "--format", "png")
    assert r.returncode == 0, r.stderr
    assert "imported 30 examples into 4 shard(s)" in r.stdout
    np.testing.assert_array_equal(_read_all(tmp_path / "s")[0], images)
    r = _cli("inspect", str(tmp_path / "s"), "--verify", "--grid", str(tmp_path / "g.png"), "--per-class", "2")
    assert r.returncode == 0, r.stderr
    assert "examples 30 in 4 shard(s)" in r.stdout and "a=10, b=10, c=10" in r.stdout and "verified" in r.stdout
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # 3 rows (classes) x 2 columns of 8x8 images upscaled x6 with 2 px gaps; row 0 col 0 = example 0
    assert grid.shape == (3 * 50 + 2, 2 * 50 + 2)
    np.testing.assert_array_equal(grid[2:50:6, 2:50:6], images[0])


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    from dpldm.cli import main

    assert main(["data", "import", "--source", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "t")]) == 2
    assert "missing.npz: .npz file not found" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "t")]) == 2
    assert "t: shard folder not found" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    assert main(["data", "inspect", str(tmp_path / "t")]) == 2
    assert "manifest.json: manifest (the folder is incomplete" in capsys.readouterr().err
    assert main(["data", "import", "--source", "digits", "--out", str(tmp_path / "t"), "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err
