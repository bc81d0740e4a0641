"""The bad-input table, part "Checks at open time" (docs/errors.md, issue 17): data that does not
fit the model, or changed after it was indexed, is refused when it is opened -- before any
private step, before any public batch is used -- with exit code 2, one line naming the folder
(and the shard and sample where there is one), no traceback, and nothing the user had changed.

Rows run the real CLI in-process on inputs built in their own `case` folder, with the runner and
rules of tests/test_bad_inputs_data.py. Every row here is `clean="absent"`: nothing new in the case
folder, so no run folder at all (`no-run-output`, a run folder without model/ or checkpoints, is
what a corrupt public shard met later in a stream would leave)."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dpldm.checkpoint import list_step_checkpoints
from dpldm.cli import main
from dpldm.data.codec import encode_payload, sample_key
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import read_shard_arrays
from dpldm.data.testing import plant_shard
from test_bad_inputs import Env, _in_process, ft
from test_bad_inputs_data import DataEnv, _pretrain, snapshot

REPO = Path(__file__).resolve().parents[1]
N = 40
HEAD = "## Checks at open time (issue 17)"


# -- what the rows build -----------------------------------------------------------------------------------

def _ok(code: int) -> None:
    assert code == 0, f"set-up command failed with {code}"


def _npz(case: Path, name: str, size: int = 16, classes: int = 3, seed: int = 0, **extra) -> Path:
    path = case / f"{name}.npz"
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (N, size, size), dtype=np.uint8), labels=np.arange(N) % classes,
             **extra)
    return path


def _latents(env: Env, case: Path, src: Path, name: str = "z") -> Path:
    _ok(main(["data", "import", "--source", str(src), "--out", str(case / f"{name}_img"), "--shard-size", "20"]))
    _ok(main(["data", "encode", "--shards", str(case / f"{name}_img"), "--autoencoder", str(env.public),
              "--out", str(case / name)]))
    return case / name


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _plant_label(folder: Path, sample: int, label: bytes) -> Path:
    """Shard 1 of `folder` rewritten (consistently indexed) with `label` at global sample `sample`."""
    xs, ys = read_shard_arrays(open_shard_folder(folder), 1)
    samples = [{"__key__": sample_key(20 + j), "npy": encode_payload(xs[j], "npy"), "cls": str(int(ys[j])).encode()}
               for j in range(20)]
    samples[sample - 20]["cls"] = label
    plant_shard(folder, 1, samples)
    return folder


def _flip_payload(folder: Path, shard: int, index: int) -> Path:
    """Invert 8 bytes inside example `index`'s payload in its shard file: the same size, still decodes."""
    f = open_shard_folder(folder)
    x = read_shard_arrays(f, shard)[0][index - f.shards[shard].first_index]
    path = f.shard_path(shard)
    b = bytearray(path.read_bytes())
    at = bytes(b).index(x.tobytes()) + x.nbytes - 8
    b[at:at + 8] = bytes(255 - v for v in b[at:at + 8])
    path.write_bytes(bytes(b))
    return folder


def _no_sha256(folder: Path) -> Path:
    for name, key in (("manifest.json", "shards"), ("index.json", "shardlist")):
        d = json.loads((folder / name).read_text())
        for s in d[key]:
            s["sha256"] = ""
        (folder / name).write_text(json.dumps(d))
    return folder


def _ft(env: Env, case: Path, private: Path, sets: tuple[str, ...] = ()) -> list[str]:
    return ft(env, case / "out", private=private, sets=sets)


def _corrupt_public(env: Env, case: Path) -> Path:
    folder = _copy(env.images, case / "images")
    for k in (0, 1):  # every shard, so the first batch meets one whatever the shuffle
        _flip_payload(folder, k, 20 * k + 5)
    return folder


# -- the table ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    what: str
    argv: Callable[[DataEnv, Path], list[str]]  # (env, case) -> argv; output, if any, goes to case/"out"
    needle: str  # the one-line error must contain this
    clean: str = "absent"  # absent | no-run-output


ROWS = [
    # private latent shards against the model (dpldm/train/private_data.py)
    Row("open-latent-shape", "latent shards of 32x32 images (2x16x16) for a model of 16x16 images (2x8x8), "
        "encoded by the model's own autoencoder",
        lambda e, c: _ft(e, c, _latents(e, c, _npz(c, "big", size=32))),
        "latents are (2, 16, 16) (C, h, w) but the model takes (2, 8, 8)"),
    Row("open-latent-label-manifest", "latent shards whose manifest counts labels 3 and 4 for `data.num_classes = 3`",
        lambda e, c: _ft(e, c, _latents(e, c, _npz(c, "five", classes=5))),
        "the manifest counts 8 example(s) of label 4, outside the private classes 0..2"),
    Row("open-latent-label-planted", "a label 4 planted at one sample of a 5-class latent folder whose manifest "
        "histogram shows labels 0..2 only",
        lambda e, c: _ft(e, c, _plant_label(_latents(e, c, _npz(c, "decl5", num_classes=np.array(5))), 27, b"4")),
        "shard-000001.tar [sample '00000027']: label 4 outside the private classes 0..2"),
    Row("open-latent-label-out-of-spec", "a label 9 planted at one sample of a 3-class latent folder",
        lambda e, c: _ft(e, c, _plant_label(_copy(e.latents, c / "z"), 33, b"9")),
        "shard-000001.tar [sample '00000033']: label 9 out of range [0, 3)"),
    Row("open-latent-label-not-integer", "a `.cls` holding `x` at one sample of a latent folder",
        lambda e, c: _ft(e, c, _plant_label(_copy(e.latents, c / "z"), 21, b"x")),
        "shard-000001.tar [sample '00000021']: label b'x' is not an integer"),
    Row("open-latent-corrupt-same-size", "latent shard with 8 payload bytes inverted (same size, still decodes)",
        lambda e, c: _ft(e, c, _flip_payload(_copy(e.latents, c / "z"), 1, 30)),
        "shard-000001.tar: sha256 differs from the index"),
    Row("open-latent-no-sha256", "latent folder whose manifest/index record no sha256 per shard",
        lambda e, c: _ft(e, c, _no_sha256(_copy(e.latents, c / "z"))),
        "malformed manifest: shard shard-000000.tar has no sha256"),
    # the recipe and private sources against the model
    Row("open-recipe-image-size", "`data.image_size = 32` (and 32x32 private images) for a model of 16x16 images",
        lambda e, c: _ft(e, c, _npz(c, "big", size=32), sets=("data.image_size=32",)),
        "data.image_size: recipe 32 != checkpoint 16"),
    Row("open-recipe-channels", "`data.channels = 3` for a model of one-channel images",
        lambda e, c: _ft(e, c, e.private, sets=("data.channels=3", "autoencoder.in_channels=3")),
        "data.channels: recipe 3 != checkpoint 1"),
    Row("open-source-label-beyond-classes", "private .npz with labels 0..4 for `data.num_classes = 3` "
        "(`unet.num_classes = 5`)",
        lambda e, c: _ft(e, c, _npz(c, "five", classes=5)),
        "has label 4 outside the private classes 0..2 (data.num_classes=3)"),
    # public shards: sha256 when opened for streaming, before any of their samples
    Row("open-public-corrupt-same-size", "public image shards with payload bytes inverted (same size), pretrain-ae",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(_corrupt_public(e, c))),
        "sha256 differs from the index"),
    Row("open-public-corrupt-same-size-ldm", "the same shards given to pretrain-ldm",
        lambda e, c: _pretrain("pretrain-ldm", e, c, str(_corrupt_public(e, c))),
        "sha256 differs from the index"),
    Row("open-public-no-sha256", "public image shards whose manifest records no sha256, pretrain-ae",
        lambda e, c: _pretrain("pretrain-ae", e, c, str(_no_sha256(_copy(e.images, c / "images")))),
        "malformed manifest: shard shard-000000.tar has no sha256"),
    Row("open-encode-no-sha256", "`data encode` of image shards whose manifest records no sha256",
        lambda e, c: ["data", "encode", "--shards", str(_no_sha256(_copy(e.images, c / "images"))),
                      "--autoencoder", str(e.public), "--out", str(c / "out")],
        "malformed manifest: shard shard-000000.tar has no sha256"),
]


# -- running a row (the rules of tests/test_bad_inputs_data.py) ------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return DataEnv(tmp_path_factory.mktemp("bad_inputs_open"))


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(row: Row, env: DataEnv):
    case = env.case(row.id)
    argv = row.argv(env, case)
    shared, mine = snapshot(env.root, skip="cases"), snapshot(case)
    code, stdout, stderr = _in_process(argv)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert code == 2, f"exit code {code}; stderr tail: {stderr[-800:]}"
    lines = [ln for ln in stderr.split("\n") if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert lines, "no error message"
    last = lines[-1]
    assert re.fullmatch(rf"dpldm {re.escape(argv[0])}: error: [^\r]+", last), repr(last)  # one whole line
    assert row.needle in last, last
    assert snapshot(env.root, skip="cases") == shared  # the shared fixtures are untouched
    after = snapshot(case)
    assert {k: v for k, v in after.items() if k in mine} == mine, "a file the user had was changed or removed"
    new = sorted(set(after) - set(mine))
    if row.clean == "absent":
        assert not new, new
    else:
        out = case / "out"
        assert not (out / "model").exists() and not list_step_checkpoints(out)


def test_every_row_is_documented_in_its_own_section():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert HEAD in doc
    section = doc.split(HEAD, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({HEAD}): {missing}"


def test_ids_are_unique_across_the_tables():
    from test_bad_inputs import ROWS as FIRST
    from test_bad_inputs_data import ROWS as DATA

    ids = [r.id for r in (*FIRST, *DATA, *ROWS)]
    assert len(ids) == len(set(ids))
