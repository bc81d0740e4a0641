"""The bad-input table, part 2 (docs/errors.md, "Data, import and pretraining (issue 13)"): output
folders of `dpldm data import|encode`, `data inspect --grid`, image folders, `--device`, public
shard folders for pretraining, and PNG folders for `dpldm evaluate`.

Each row builds its inputs in a fresh folder `case` and runs the real CLI (in-process, or as a
real process where the row needs one). It must give exit code 2, a last stderr line that is the
whole one-line error (`dpldm CMD: error: ...`, not glued to a progress line), no traceback, and
leave every file the user had byte-identical: the row's `case` folder and the shared fixtures
(hashed before and after). What the run may leave behind is the row's `clean` rule:
    absent         nothing new anywhere in `case`
    no-manifest    only an unmarked, resumable partial output (no manifest.json / index.json)
    no-run-output  a run folder without model/ and without step checkpoints
Rows whose situation this machine cannot create (a read-only or full file system needs root with
mount rights, or a non-root user) are skipped with the reason, never counted as passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from dpldm.checkpoint import list_step_checkpoints
from dpldm.data.codec import encode_payload, sample_key
from dpldm.data.testing import mount_tmpfs, plant_shard, unmount
from test_bad_inputs import MODEL, Env, _in_process

REPO = Path(__file__).resolve().parents[1]


class DataEnv(Env):
    """The shared fixtures of test_bad_inputs.Env plus a folder per row and mounts to undo."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.mounts: list[Path] = []

    def case(self, name: str) -> Path:
        path = self.root / "cases" / name
        path.mkdir(parents=True)
        return path


# -- what the rows build ------------------------------------------------------------------------------

def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)).save(path)
    return path


def _grey(seed: int = 0, shape=(16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _folder(case: Path, classes: dict[str, list[np.ndarray]], loose: list[np.ndarray] = (), name: str = "imgs") -> Path:
    """case/name/<class>/<j>.png for every class, and `loose` images directly in case/name."""
    for c, arrays in classes.items():
        for j, a in enumerate(arrays):
            _png(case / name / c / f"{j}.png", a)
    for j, a in enumerate(loose):
        _png(case / name / f"loose{j}.png", a)
    return case / name


def _file(path: Path, text: str = "mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _palette_folder(case: Path) -> Path:
    path = case / "imgs" / "0" / "p.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.stack([_grey(1)] * 3, -1)).quantize(4).save(path)
    return case / "imgs"


def _npz(case: Path, name: str = "x.npz", n: int = 20, seed: int = 0) -> Path:
    path = case / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.random.default_rng(seed).integers(0, 256, (n, 16, 16), dtype=np.uint8),
             labels=np.arange(n) % 3)
    return path


def _imp(source: Path | str, out: Path, *extra: str) -> list[str]:
    return ["data", "import", "--source", str(source), "--out", str(out), *extra]


def _enc(env: Env, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "encode", "--shards", str(shards), "--autoencoder", str(env.public), "--out", str(out), *extra]


def _copy_images(env: Env, case: Path) -> Path:
    shutil.copytree(env.images, case / "images")
    return case / "images"


def _pretrain(cmd: str, env: Env, case: Path, public: str, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    argv = [cmd, "--out", str(case / "out"), "--no-wandb"]
    if cmd == "pretrain-ldm":
        argv += ["--autoencoder", str(env.public)]
    for s in MODEL + ["train.threads=1", "train.ae_steps=2", "train.steps=2", "train.ae_batch_size=8",
                      "train.batch_size=8", f"data.public={json.dumps(public)}", *sets]:
        argv += ["--set", s]
    return argv + list(extra)


def _readonly(env: DataEnv, case: Path) -> Path:
    ro = case / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif mount_tmpfs(ro, "64k", readonly=True):
        env.mounts.append(ro)
    else:
        pytest.skip("root without mount rights: no way to make a folder unwritable on this machine")
    return ro


def _small_fs(env: DataEnv, case: Path) -> Path:
    fs = case / "fs"
    if not mount_tmpfs(fs, "96k"):
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN); "
                    "import-file-size-limit and tests/test_data_outdir.py cover write failures")
    env.mounts.append(fs)
    return fs


def _other_dataset(env: Env, case: Path) -> list[str]:
    from dpldm.cli import main

    assert main(_imp(_npz(case, "a.npz", seed=1), case / "s")) == 0
    return _imp(_npz(case, "b.npz", seed=2), case / "s")


def _fsize_source(env: Env, case: Path) -> list[str]:
    x = np.zeros((20, 64, 64), np.uint8)
    x[10:] = np.random.default_rng(0).integers(0, 256, (10, 64, 64), dtype=np.uint8)  # shard 1 compresses badly
    np.savez(case / "x.npz", images=x, labels=np.arange(20) % 3)
    return _imp(case / "x.npz", case / "out", "--shard-size", "10", "--format", "png")


def _disk_full(env: DataEnv, case: Path) -> list[str]:
    fs = _small_fs(env, case)
    return _imp(_npz(case, n=100), fs / "out", "--shard-size", "20")


def _bad_public(env: Env, case: Path) -> Path:
    folder = _copy_images(env, case)
    samples = [{"__key__": sample_key(i), "npy": encode_payload(_grey(i), "npy"), "cls": str(i % 3).encode()}
               for i in range(20)]
    samples[3]["npy"] = b"not an array"
    plant_shard(folder, 0, samples)
    return folder


def _incomplete_public(env: Env, case: Path) -> Path:
    folder = _copy_images(env, case)
    (folder / "manifest.json").unlink()
    return folder


def _tiff(case: Path, array: np.ndarray, mode: str) -> Path:
    path = case / "imgs" / "0" / "a.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(array, mode=mode).save(path)
    return case / "imgs"


# -- the table ------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    what: str
    argv: Callable[[DataEnv, Path], list[str]]  # (env, case) -> argv; output, if any, goes to case/"out"
    needle: str  # the one-line error must contain this
    via: str = "inprocess"  # inprocess | fsize (a real process limited to 50 kB files: EFBIG)
    clean: str = "absent"  # absent | no-manifest | no-run-output


_A, _B = _grey(1), _grey(2)
ROWS = [
    # output folders of import / encode
    Row("encode-out-is-shards", "`data encode --out` = `--shards`, with `--overwrite`",
        lambda e, c: _enc(e, _copy_images(e, c), c / "images", "--overwrite"), "is the input --shards itself"),
    Row("encode-out-inside-shards", "`data encode --out` inside the `--shards` folder",
        lambda e, c: _enc(e, _copy_images(e, c), c / "images" / "z"), "lies inside the input --shards"),
    Row("encode-out-contains-shards", "`data encode --out` a folder that holds the `--shards` folder",
        lambda e, c: _enc(e, _copy_images(e, c), c, "--overwrite"), "contains the input --shards"),
    Row("import-out-is-source-folder", "`data import --out` = the image folder `--source`, with `--overwrite`",
        lambda e, c: _imp(_folder(c, {"0": [_A], "1": [_B]}), c / "imgs", "--overwrite"),
        "is the input --source itself"),
    Row("import-out-inside-source", "`data import --out` inside the image folder `--source`",
        lambda e, c: _imp(_folder(c, {"0": [_A], "1": [_B]}), c / "imgs" / "0" / "out"), "lies inside the input --source"),
    Row("import-out-contains-npz", "`data import --out` the folder holding the `--source` .npz",
        lambda e, c: _imp(_npz(c, "d/x.npz"), c / "d", "--overwrite"), "contains the input --source"),
    Row("import-out-is-file", "`data import --out` an existing file",
        lambda e, c: _imp(_npz(c), _file(c / "f.txt"), "--overwrite"),
        "is a file, not a folder"),
    Row("encode-out-is-file", "`data encode --out` an existing file",
        lambda e, c: _enc(e, e.images, _file(c / "f.txt")), "is a file, not a folder"),
    Row("import-out-under-a-file", "`data import --out` below an existing file",
        lambda e, c: _imp(_npz(c), _file(c / "f.txt") / "sub"), "f.txt is a file"),
    Row("import-out-foreign-folder", "`data import --out` a non-empty folder dpldm did not write, `--overwrite`",
        lambda e, c: _imp(_npz(c), _file(c / "out" / "notes.txt").parent, "--overwrite"),
        "is not empty and was not written by dpldm (it holds 'notes.txt')"),
    Row("import-out-foreign-manifest", "`data import --out` a folder with someone else's manifest.json",
        lambda e, c: _imp(_npz(c), _file(c / "out" / "manifest.json", "{}").parent, "--overwrite"),
        "not a manifest written by dpldm"),
    Row("import-out-other-dataset", "`data import` into a dpldm folder of another dataset, no `--overwrite`",
        _other_dataset, "already holds a different dataset"),
    Row("import-out-unwritable", "`data import --out` in a folder the user cannot write",
        lambda e, c: _imp("glyphs", _readonly(e, c) / "out", "--num", "10000000"), "cannot write in"),
    Row("import-file-size-limit", "a write fails mid-import (file size limit, EFBIG; a real process)",
        _fsize_source, "shard-000001.tar: cannot write (file size limit reached", via="fsize", clean="no-manifest"),
    Row("import-disk-full", "the disk fills up mid-import (a 96 kB tmpfs, ENOSPC)", _disk_full,
        "shard-000001.tar: cannot write (disk full", clean="no-manifest"),
    # data inspect --grid
    Row("inspect-grid-is-folder", "`data inspect --grid DIR` (a folder)",
        lambda e, c: ["data", "inspect", str(e.images), "--grid", str(c)], "is a folder: give a .png file path"),
    Row("inspect-grid-not-png", "`data inspect --grid x.jpg`",
        lambda e, c: ["data", "inspect", str(e.images), "--grid", str(c / "g.jpg")], "give a path ending in .png"),
    Row("inspect-grid-foreign-file", "`data inspect --grid` an existing PNG dpldm did not write",
        lambda e, c: ["data", "inspect", str(e.images), "--grid", str(_png(c / "mine.png", _A))],
        "was not written by `dpldm data inspect`"),
    Row("inspect-grid-under-a-file", "`data inspect --grid` below an existing file",
        lambda e, c: ["data", "inspect", str(e.images), "--grid", str(_file(c / "f.txt") / "g.png")],
        "f.txt is a file"),
    # image folders
    Row("import-mixed-modes", "image folder with a greyscale and an RGB image, no `--mode`",
        lambda e, c: _imp(_folder(c, {"0": [_A], "1": [np.stack([_B] * 3, -1)]}), c / "out"),
        "images of different modes"),
    Row("import-palette-needs-mode", "image folder of palette images, no `--mode`",
        lambda e, c: _imp(_palette_folder(c), c / "out"), "is a palette image: pass --mode"),
    Row("import-sizes-differ", "image folder with 16x16 and 12x16 images, no `--resize`",
        lambda e, c: _imp(_folder(c, {"0": [_A], "1": [_grey(3, (12, 16))]}), c / "out"), "images of different sizes"),
    Row("import-resize-not-square", "`--resize 8` of a non-square image without `--center-crop`",
        lambda e, c: _imp(_folder(c, {"0": [_grey(3, (12, 16))]}), c / "out", "--resize", "8"), "is not square"),
    Row("import-mixed-label-names", "class folders `0`, `1` and `cat`",
        lambda e, c: _imp(_folder(c, {"0": [_A], "1": [_B], "cat": [_A]}), c / "out"),
        "class folders mix integer names ('0') and other names ('cat')"),
    Row("import-duplicate-integer-labels", "class folders `7` and `07`",
        lambda e, c: _imp(_folder(c, {"7": [_A], "07": [_B]}), c / "out"), "are the same label 7"),
    Row("import-image-beside-class-folders", "an image next to the class folders",
        lambda e, c: _imp(_folder(c, {"0": [_A]}, loose=[_A]), c / "out"),
        "loose0.png: an image directly in the folder"),
    Row("import-unreadable-image", "a `.png` that is not an image",
        lambda e, c: _imp(_file(c / "imgs" / "0" / "bad.png", "nope").parents[1], c / "out"), "bad.png: unreadable image"),
    Row("import-float-image", "a 32-bit float TIFF in an image folder",
        lambda e, c: _imp(_tiff(c, np.full((8, 8), 0.5, np.float32), "F"), c / "out"), "image mode 'F' is not supported"),
    Row("import-32bit-values", "a 32-bit integer TIFF with values above 65535",
        lambda e, c: _imp(_tiff(c, np.array([[0, 70000], [1, 2]], np.int32), "I"), c / "out"), "outside 16-bit 0..65535"),
    Row("import-mode-on-npz", "`--mode L` for a .npz source",
        lambda e, c: _imp(_npz(c), c / "out", "--mode", "L"), "--mode/--resize/--center-crop apply to image folders only"),
    Row("import-resize-zero", "`--resize 0`",
        lambda e, c: _imp(_folder(c, {"0": [_A]}), c / "out", "--resize", "0"), "--resize must be an integer >= 1"),
    Row("import-shard-folder-as-source", "a shard folder given as the image folder `--source`",
        lambda e, c: _imp(_copy_images(e, c), c / "out"), "a shard folder (it holds manifest.json), not an image folder"),
    Row("import-empty-class-folders", "class folders without any image",
        lambda e, c: _imp(_file(c / "imgs" / "0" / "readme.txt").parents[1], c / "out"), "no images (.bmp"),
    # devices
    Row("encode-device-missing", "`data encode --device cuda:99`",
        lambda e, c: _enc(e, e.images, c / "out", "--device", "cuda:99"), "--device=cuda:99"),
    Row("pretrain-ae-device-missing", "`pretrain-ae --device cuda:99`",
        lambda e, c: _pretrain("pretrain-ae", e, c, "glyphs", "--device", "cuda:99"), "--device=cuda:99"),
    Row("pretrain-ldm-device-bad-spec", "`pretrain-ldm --device gpu`",
        lambda e, c: _pretrain("pretrain-ldm", e, c, "glyphs", "--device", "gpu"), "--device: expected auto"),
    Row("pretrain-train-device-missing", "`pretrain-ae --set train.device=\"cuda:99\"`",
        lambda e, c: _pretrain("pretrain-ae", e, c, "glyphs", sets=('train.device="cuda:99"',)), "train.device=cuda:99"),
    # public shard folders for pretraining
    Row("pretrain-public-shards-bad-sample", "`data.public` shards with an undecodable sample (pretrain-ae)",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(_bad_public(e, c))),
        "shard-000000.tar [sample '00000003']: cannot decode .npy payload", clean="no-run-output"),
    Row("pretrain-ldm-public-shards-bad-sample", "the same shards given to pretrain-ldm",
        lambda e, c: _pretrain("pretrain-ldm", e, c, str(_bad_public(e, c))),
        "shard-000000.tar [sample '00000003']: cannot decode .npy payload", clean="no-run-output"),
    Row("pretrain-public-latent-shards", "`data.public` = a latent shard folder",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(e.latents)), "holds latents, not images"),
    Row("pretrain-public-shards-incomplete", "`data.public = \"shards:DIR\"` without manifest.json",
        lambda e, c: _pretrain("pretrain-ae", e, c, "shards:" + str(_incomplete_public(e, c))),
        "manifest (the folder is incomplete"),
    Row("pretrain-public-shards-wrong-size", "16x16 public shards for `data.image_size = 32`",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(e.images), sets=("data.image_size=32",)),
        "images are (16, 16) (H, W[, C]) but data.image_size/data.channels ask for (32, 32, 1)"),
    Row("pretrain-public-shards-too-few", "40 public examples for a batch of 64",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(e.images), sets=("train.ae_batch_size=64",)),
        "40 examples cannot fill one batch of 64"),
    # evaluate: PNG folders
    Row("evaluate-mixed-label-names", "`evaluate --samples` PNG folder with class folders `0` and `cat`",
        lambda e, c: ["evaluate", "--samples", str(_folder(c, {"0": [_A], "cat": [_B]})), "--no-fid",
                      "--real-test", str(e.private)], "class folders mix integer names ('0') and other names ('cat')"),
    Row("evaluate-mixed-modes", "`evaluate --samples` PNG folder with greyscale and RGB images",
        lambda e, c: ["evaluate", "--samples", str(_folder(c, {"0": [_A], "1": [np.stack([_B] * 3, -1)]})), "--no-fid",
                      "--real-test", str(e.private)], "images of different modes"),
    Row("evaluate-images-beside-class-folders", "`evaluate --samples` PNGs both loose and in class folders",
        lambda e, c: ["evaluate", "--samples", str(_folder(c, {"0": [_B]}, loose=[_A])), "--no-fid",
                      "--real-test", str(e.private)],
        "both directly in the folder (loose0.png)"),
]


# -- running a row ----------------------------------------------------------------------------------------

def _limited_process(argv: list[str]) -> tuple[int, str, str]:
    def limit():  # files over 50 kB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dpldm", *argv], cwd=REPO, env=env, capture_output=True,
                       preexec_fn=limit, timeout=600)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def snapshot(folder: Path, skip: str | None = None) -> dict[str, str]:
    """relative path -> sha256 of every file (and '/'-suffixed entry of every folder) under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        out[rel + ("/" if p.is_dir() else "")] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = DataEnv(tmp_path_factory.mktemp("bad_inputs_data"))
    yield e
    for m in e.mounts:
        unmount(m)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(row: Row, env: DataEnv):
    case = env.case(row.id)
    argv = row.argv(env, case)
    shared, mine = snapshot(env.root, skip="cases"), snapshot(case)
    code, stdout, stderr = (_limited_process if row.via == "fsize" else _in_process)(argv)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert code == 2, f"exit code {code}; stderr tail: {stderr[-800:]}"
    lines = [ln for ln in stderr.split("\n") if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert lines, "no error message"
    last = lines[-1]
    assert re.fullmatch(rf"dpldm {re.escape(argv[0])}: error: [^\r]+", last), repr(last)  # one whole line
    assert row.needle in last, last
    # nothing the user had is changed or deleted: the shared fixtures and the row's own files
    assert snapshot(env.root, skip="cases") == shared
    after = snapshot(case)
    assert {k: v for k, v in after.items() if k in mine} == mine, "a file the user had was changed or removed"
    new = sorted(set(after) - set(mine))
    if row.clean == "absent":
        assert not new, new
    elif row.clean == "no-manifest":
        assert not [n for n in new if n.endswith(("manifest.json", "index.json"))], new
    else:
        out = case / "out"
        assert not (out / "model").exists() and not list_step_checkpoints(out)


def test_every_row_is_documented_in_its_own_section():
    doc = (REPO / "docs" / "errors.md").read_text()
    head = "## Data, import and pretraining (issue 13)"
    assert head in doc
    section = doc.split(head, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({head}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_the_two_tables_hold_at_least_60_rows():
    from test_bad_inputs import ROWS as FIRST

    assert len(FIRST) + len(ROWS) >= 60
    assert not {r.id for r in FIRST} & {r.id for r in ROWS}
