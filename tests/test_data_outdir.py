"""Output shard folders: --out never the input (nor inside or around it), --overwrite only removes
what dpldm wrote, and a full disk / unwritable folder is one line with the inputs intact and the
partial output unmarked (no manifest.json) and resumable."""
import errno
import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpldm.cli import main
from dpldm.data.errors import OutputError, SourceError
from dpldm.data.latents import encode_shards
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import import_arrays
from dpldm.data.testing import indexed_images, mount_tmpfs, unmount

REPO = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def encode_fn(x):  # (B, C, H, W) -> (B, 1, H/2, W/2): a stand-in encoder
    return x[:, :1, ::2, ::2] * 0.5


@pytest.fixture
def images(tmp_path):
    x, y, meta = indexed_images(30, (8, 8), num_classes=3)
    import_arrays(x, y, meta, tmp_path / "data" / "images", shard_size=10)
    return tmp_path / "data" / "images"


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_encode_out_is_never_the_input(tmp_path, images, where, capsys):
    out = {"same": images, "inside": images / "latents", "around": images.parent}[where]
    before = tree(tmp_path)
    with pytest.raises(OutputError, match={"same": "is the input --shards itself", "inside": "lies inside the input",
                                           "around": "contains the input --shards"}[where]):
        encode_shards(images, out, encode_fn, autoencoder_sha256="0" * 64, overwrite=True)
    assert tree(tmp_path) == before
    # the CLI: one line, exit 2, nothing changed (the autoencoder is checked after the folders)
    code = main(["data", "encode", "--shards", str(images), "--autoencoder", str(tmp_path / "nope"),
                 "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dpldm data: error: --out") and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before
    open_shard_folder(images)  # still a complete, valid folder


def test_import_out_is_never_the_source_folder(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "src" / c / "x.png")
    before = tree(tmp_path)
    for out, needle in ((tmp_path / "src", "is the input --source itself"), (tmp_path / "src" / "a" / "s", "lies inside"),
                        (tmp_path, "contains the input --source")):
        assert main(["data", "import", "--source", str(tmp_path / "src"), "--out", str(out), "--overwrite"]) == 2
        assert needle in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    x, y, meta = indexed_images(10, (4, 4))
    (tmp_path / "f.txt").write_text("mine")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        import_arrays(x, y, meta, tmp_path / "f.txt", overwrite=True)
    with pytest.raises(OutputError, match=r"cannot create it, .*f.txt is a file"):
        import_arrays(x, y, meta, tmp_path / "f.txt" / "sub")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"is not empty and was not written by dpldm \(it holds 'notes.txt'\)"):
        import_arrays(x, y, meta, tmp_path / "mine", overwrite=True)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "manifest.json").write_text('{"name": "someone else\'s"}')
    with pytest.raises(OutputError, match="not a manifest written by dpldm"):
        import_arrays(x, y, meta, tmp_path / "theirs", overwrite=True)
    assert (tmp_path / "f.txt").read_text() == "mine" and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["manifest.json"]


def test_overwrite_removes_only_what_dpldm_wrote(tmp_path):
    out = tmp_path / "s"
    a = indexed_images(30, (4, 4), seed=0)
    import_arrays(*a, out, shard_size=10)
    (out / "notes.txt").write_text("mine")
    (out / "shard-000007.tar").write_bytes(b"not dpldm's")  # named like a shard, but no record lists it
    b = indexed_images(12, (4, 4), seed=1)
    with pytest.raises(SourceError, match="already holds a different dataset"):
        import_arrays(*b, out, shard_size=5)
    import_arrays(*b, out, shard_size=5, overwrite=True)  # 3 shards now
    names = sorted(p.name for p in out.iterdir())
    assert names == ["index.json", "manifest.json", "notes.txt", "shard-000000.tar", "shard-000001.tar",
                     "shard-000002.tar", "shard-000007.tar"]
    assert (out / "shard-000007.tar").read_bytes() == b"not dpldm's" and (out / "notes.txt").read_text() == "mine"
    c = indexed_images(80, (4, 4), seed=2)  # 8 shards of 10: shard 7 would replace the stranger's file
    with pytest.raises(OutputError, match=r"shard-000007.tar: exists but dpldm's records .* do not list it"):
        import_arrays(*c, out, shard_size=10, overwrite=True)
    assert (out / "shard-000007.tar").read_bytes() == b"not dpldm's"
    assert not (out / "manifest.json").exists()  # left incomplete, as the error says


def test_disk_full_at_fsync_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    """ENOSPC reported by the kernel when the second shard is flushed (os.fsync, where delayed
    allocation reports it): one line naming the shard, no manifest, first shard kept; the rerun
    after 'freeing space' keeps it and finishes."""
    x, y, meta = indexed_images(30, (8, 8), num_classes=3)
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    src_before = tree(tmp_path)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".shard-000001.tar." in name:
            calls.append(name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["data", "import", "--source", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out"), "--shard-size", "10"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert calls, "the simulated disk-full never triggered"
    last = err.strip().splitlines()[-1]
    assert last.startswith("dpldm data: error: ") and "shard-000001.tar: cannot write (disk full" in last
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "index.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".progress.json", "shard-000000.tar"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(argv) == 0
    assert "written 2, kept 1 intact" in capsys.readouterr().out
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == src_before


def test_disk_full_on_a_real_small_file_system(tmp_path, capsys):
    fs = tmp_path / "fs"
    if not mount_tmpfs(fs, "96k"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the fsync test covers ENOSPC")
    try:
        x = np.random.default_rng(0).integers(0, 256, (100, 16, 16), dtype=np.uint8)
        np.savez(tmp_path / "d.npz", images=x, labels=np.arange(100) % 3)
        argv = ["data", "import", "--source", str(tmp_path / "d.npz"), "--out", str(fs / "out"), "--shard-size", "20"]
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("dpldm data: error: ") and "No space left on device" in last and "rerun" in last
        assert not (fs / "out" / "manifest.json").exists()
        subprocess.run(["mount", "-o", "remount,size=2m", str(fs)], check=True)  # free space
        assert main(argv) == 0
        f = open_shard_folder(fs / "out")
        assert f.num_examples == 100
    finally:
        unmount(fs)


def test_unwritable_folder_is_refused_before_work_starts(tmp_path, capsys):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not mount_tmpfs(ro, "64k", readonly=True):
        pytest.skip("running as root without permission to mount: no way to make a folder unwritable here")
    try:
        code = main(["data", "import", "--source", "glyphs", "--num", "10000000", "--out", str(ro / "out")])
        err = capsys.readouterr().err  # (10M glyphs would take hours: the check comes first)
        assert code == 2 and f"--out {ro / 'out'}: cannot write in {ro}" in err and len(err.strip().splitlines()) == 1
    finally:
        unmount(ro) if os.geteuid() == 0 else ro.chmod(0o755)


def test_error_starts_on_its_own_line_after_the_progress_line(tmp_path):
    """A file-size limit (EFBIG) hit on the second shard of a real process: the `\\r` progress line
    is ended before the one-line error."""
    x = np.zeros((20, 64, 64), np.uint8)
    x[10:] = np.random.default_rng(0).integers(0, 256, (10, 64, 64), dtype=np.uint8)  # shard 1 compresses badly
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(20) % 3)

    def limit():  # shard 0 (blank PNGs) is 30 KiB, shard 1 (noise) about 70 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    p = subprocess.run([sys.executable, "-m", "dpldm", "data", "import", "--source", str(tmp_path / "d.npz"), "--out",
                        str(tmp_path / "out"), "--shard-size", "10", "--format", "png"],
                       cwd=REPO, capture_output=True, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert "\rimport: shard 1 done" in err  # the first shard was written, with its progress line
    last = err.split("\n")[-2]  # the error is the whole last line: no "\r...progress" before it
    assert last.startswith("dpldm data: error: ") and "shard-000001.tar: cannot write (file size limit" in last
    assert "Traceback" not in err and not (tmp_path / "out" / "manifest.json").exists()
