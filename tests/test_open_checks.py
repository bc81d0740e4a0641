"""Issue 17, "checks at open time, not at step 3": what is wrong with the data is found when it is
opened, before any private step, and nothing is written.

* private latent shards: the latent shape against the model, every label against data.num_classes
  (the manifest's histogram, then the labels themselves, read with each shard's sha256);
* the recipe's data.image_size/channels against the public model, a source's labels;
* `dpldm data import` of an image folder warns about pixel-identical images and symlinked class
  folders/files (warnings, the import goes on);
* public shards are sha256-verified when the stream opens each one, before any of its samples.

Expected values come from how the inputs were built (labels planted at known samples, images
copied on purpose), not from the code under test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpldm.cli import main
from dpldm.data.codec import encode_payload, sample_key
from dpldm.data.errors import ShardError
from dpldm.data.loaders import PrivateIndexedDataset, stream_loader
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import import_arrays, read_shard_arrays
from dpldm.data.testing import index_of, indexed_images, plant_shard
from test_bad_inputs import Env, ft

N = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("open_checks"))


class _Spy:
    """Counts what the trainer does with private data: chunks read and logical steps run."""

    def __init__(self, monkeypatch) -> None:
        from dpldm.train import dp_finetune

        self.reads, self.steps = 0, 0
        get_batch, step = PrivateIndexedDataset.get_batch, dp_finetune.Trainer.step

        def counted_get_batch(ds, idx):
            self.reads += 1
            return get_batch(ds, idx)

        def counted_step(trainer):
            self.steps += 1
            return step(trainer)

        monkeypatch.setattr(PrivateIndexedDataset, "get_batch", counted_get_batch)
        monkeypatch.setattr(dp_finetune.Trainer, "step", counted_step)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def _latents_of(env: Env, name: str, images: np.ndarray, labels: np.ndarray, **extra) -> Path:
    src = env.npz(name, images=images, labels=labels, **extra)
    shards, out = env.root / f"{name}_img", env.root / f"{name}_z"
    assert main(["data", "import", "--source", str(src), "--out", str(shards), "--shard-size", "20"]) == 0
    assert main(["data", "encode", "--shards", str(shards), "--autoencoder", str(env.public), "--out", str(out)]) == 0
    return out


def _refused_before_any_step(env: Env, private: Path, needle: str, monkeypatch, capsys, sets=()) -> str:
    spy = _Spy(monkeypatch)
    out = env.fresh("run")
    capsys.readouterr()
    code, last = _run(ft(env, out, private=private, sets=tuple(sets)), capsys)
    assert code == 2, last
    assert last.startswith("dpldm finetune: error: ") and needle in last, last
    assert (spy.reads, spy.steps) == (0, 0)  # no private chunk was read, no step ran
    assert not out.exists()  # no run folder, no checkpoint, no model
    return last


# -- private latent shards ------------------------------------------------------------------------------

def test_control_matching_latents_train(env, monkeypatch, capsys):
    """The negative control of the refusals below: the same recipe on fitting latents trains."""
    spy = _Spy(monkeypatch)
    out = env.fresh("run")
    assert main(ft(env, out, "--max-steps", "1", private=env.latents)) == 0
    assert spy.steps == 1 and spy.reads >= 1


def test_latent_shape_of_another_image_size_is_refused(env, monkeypatch, capsys):
    # 32x32 images through the model's own autoencoder (f = 2): (2, 16, 16) latents, same autoencoder
    # hash, for a model of 16x16 images = (2, 8, 8) latents. Before the check this trained with exit 0.
    rng = np.random.default_rng(3)
    z = _latents_of(env, "big", rng.integers(0, 256, (N, 32, 32), dtype=np.uint8), np.arange(N) % 3)
    assert json.loads((z / "manifest.json").read_text())["latent_shape"] == [2, 16, 16]
    last = _refused_before_any_step(env, z, "latents are (2, 16, 16) (C, h, w) but the model takes (2, 8, 8)",
                                    monkeypatch, capsys)
    assert str(z) in last and "encoded from (32, 32) images" in last


def test_label_beyond_the_private_classes_in_the_manifest(env, monkeypatch, capsys):
    # labels 0..4: within the embedder (unet.num_classes = 5) but outside data.num_classes = 3
    rng = np.random.default_rng(4)
    z = _latents_of(env, "five", rng.integers(0, 256, (N, 16, 16), dtype=np.uint8), np.arange(N) % 5)
    last = _refused_before_any_step(env, z, "counts 8 example(s) of label 4, outside the private classes 0..2",
                                    monkeypatch, capsys)
    assert str(z) in last


def _plant_label(env: Env, src: Path, name: str, sample: int, label: bytes) -> Path:
    """A copy of latent folder `src` whose shard 1 holds `label` at global sample `sample` (consistently
    re-indexed: size and sha256 match, the manifest's class histogram still says what it said)."""
    folder = env.copy(src, name)
    xs, ys = read_shard_arrays(open_shard_folder(folder), 1)
    samples = [{"__key__": sample_key(20 + j), "npy": encode_payload(xs[j], "npy"), "cls": str(int(ys[j])).encode()}
               for j in range(20)]
    samples[sample - 20]["cls"] = label
    plant_shard(folder, 1, samples)
    return folder


def test_label_beyond_the_private_classes_in_a_shard(env, monkeypatch, capsys):
    # a folder declaring 5 classes (num_classes in the .npz) whose labels are 0..2, with label 4 planted
    # at sample 27: only reading the labels finds it (before: an IndexError or the null class, mid-run)
    rng = np.random.default_rng(5)
    z = _latents_of(env, "five_declared", rng.integers(0, 256, (N, 16, 16), dtype=np.uint8), np.arange(N) % 3,
                    num_classes=np.array(5))
    bad = _plant_label(env, z, "planted4", 27, b"4")
    last = _refused_before_any_step(env, bad, "[sample '00000027']: label 4 outside the private classes 0..2",
                                    monkeypatch, capsys)
    assert "shard-000001.tar" in last


def test_label_outside_the_folder_classes_in_a_shard(env, monkeypatch, capsys):
    bad = _plant_label(env, env.latents, "planted9", 33, b"9")
    _refused_before_any_step(env, bad, "shard-000001.tar [sample '00000033']: label 9 out of range [0, 3)",
                             monkeypatch, capsys)


def test_read_labels_matches_the_source_and_verifies_sha256(env):
    f = open_shard_folder(env.latents)
    want = np.arange(N) % 3  # the labels Env.private was built with
    got = np.concatenate([f.read_labels(k) for k in range(len(f.shards))])
    assert got.tolist() == want.tolist()
    ds = PrivateIndexedDataset(env.latents)
    assert ds.read_labels().tolist() == want.tolist()
    assert ds._checked == {0, 1}  # verified once here, not again by the first Poisson step
    ds.close()

    folder = env.copy(env.latents, "flipped")
    path = folder / "shard-000000.tar"
    z = read_shard_arrays(open_shard_folder(env.latents), 0)[0][5]  # sample 5's latent bytes
    b = bytearray(path.read_bytes())
    at = bytes(b).index(z.tobytes()) + 8
    b[at:at + 4] = bytes(x ^ 0xFF for x in b[at:at + 4])  # same size; a finite float becomes another
    path.write_bytes(bytes(b))
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*sha256 differs from the index"):
        open_shard_folder(folder).read_labels(0)
    assert open_shard_folder(folder).read_labels(1).tolist() == want[20:].tolist()


# -- the recipe and the sources against the model -----------------------------------------------------

def test_recipe_image_size_other_than_the_model(env, monkeypatch, capsys):
    # 32x32 private images and a recipe saying 32: consistent with each other, not with the 16x16 model
    rng = np.random.default_rng(6)
    src = env.npz("big_src", images=rng.integers(0, 256, (N, 32, 32), dtype=np.uint8), labels=np.arange(N) % 3)
    out = env.fresh("run")
    spy = _Spy(monkeypatch)
    capsys.readouterr()
    code, last = _run(ft(env, out, private=src, sets=("data.image_size=32",)), capsys)
    assert code == 2 and "data.image_size: recipe 32 != checkpoint 16" in last, last
    assert spy.steps == 0 and not out.exists()


def test_source_label_beyond_the_private_classes(env, monkeypatch, capsys):
    rng = np.random.default_rng(7)
    src = env.npz("src5", images=rng.integers(0, 256, (N, 16, 16), dtype=np.uint8), labels=np.arange(N) % 5)
    out = env.fresh("run")
    spy = _Spy(monkeypatch)
    capsys.readouterr()
    code, last = _run(ft(env, out, private=src), capsys)
    assert code == 2 and "has label 4 outside the private classes 0..2 (data.num_classes=3)" in last, last
    assert spy.steps == 0 and not out.exists()


# -- image folder import: warnings ----------------------------------------------------------------------

def _png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _imgs(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(100 + i).integers(0, 256, (16, 16), dtype=np.uint8) for i in range(n)]


def test_import_warns_about_duplicates_and_links(tmp_path, capsys):
    a, b, c, d = _imgs(4)
    root = tmp_path / "imgs"
    _png(root / "0" / "0.png", a)
    _png(root / "0" / "1.png", b)
    _png(root / "1" / "0.png", c)
    _png(root / "1" / "1.png", a)  # a copy of 0/0.png, saved again
    (root / "2").symlink_to(root / "1", target_is_directory=True)  # class folder 2 is folder 1
    _png(root / "3" / "0.png", d)
    (root / "3" / "1.png").symlink_to(root / "0" / "1.png")  # a file linked into another class
    capsys.readouterr()
    assert main(["data", "import", "--source", str(root), "--out", str(tmp_path / "out")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    # by construction: a at 0/0, 1/1, 2/1 (labels 0, 1, 2); b at 0/1, 3/1 (0, 3); c at 1/0, 2/0 (1, 2)
    # -> 8 images, 3 groups of identical pixels, 4 copies beyond the first of each, all 3 mixing labels
    assert len(warnings) == 4, warnings
    links, same, files, dups = warnings
    assert "1 class folder(s) are symbolic links, e.g. 2 -> " in links
    assert "1 group(s) of class folders are the same folder" in same and "1 = 2" in same
    assert "1 image file(s) are symbolic links, e.g. 3/1.png -> " in files
    assert "4 image(s) duplicate another one's pixels exactly (3 group(s) of identical images, 3 with different " \
           "labels)" in dups
    assert "0/0.png (label 0) = 1/1.png (label 1) = 2/1.png (label 2)" in dups
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_examples"] == 8 and len(m["source_meta"]["warnings"]) == 4  # imported anyway, warnings recorded


def test_import_of_a_clean_folder_warns_nothing(tmp_path, capsys):
    root = tmp_path / "imgs"
    for j, a in enumerate(_imgs(4)):
        _png(root / str(j % 2) / f"{j}.png", a)
    capsys.readouterr()
    assert main(["data", "import", "--source", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "warnings" not in json.loads((tmp_path / "out" / "manifest.json").read_text())["source_meta"]


# -- public shards: sha256 verified while streaming --------------------------------------------------------

def _flip_pixels(folder: Path, images: np.ndarray, index: int, shard: str) -> None:
    """Invert the last 8 pixels of example `index` inside its shard file (same size; still decodes)."""
    path = folder / shard
    b = bytearray(path.read_bytes())
    at = bytes(b).index(images[index].tobytes()) + images[index].nbytes - 8
    b[at:at + 8] = bytes(255 - x for x in b[at:at + 8])
    path.write_bytes(bytes(b))


@pytest.fixture()
def public_shards(tmp_path):
    images, labels, meta = indexed_images(40, shape=(16, 16), num_classes=4)
    import_arrays(images, labels, meta, tmp_path / "pub", shard_size=10)
    _flip_pixels(tmp_path / "pub", images, 25, "shard-000002.tar")
    return tmp_path / "pub", images


def test_stream_stops_at_a_corrupt_shard_before_its_samples(public_shards):
    folder, images = public_shards
    seen: list[int] = []
    with pytest.raises(ShardError, match=r"shard-000002\.tar.*sha256 differs from the index"):
        for x, _ in stream_loader(folder, batch_size=1, shuffle_buffer=0):
            seen += index_of(x).tolist()
    assert not set(seen) & set(range(20, 30))  # nothing of the corrupt shard was yielded
    assert set(seen) <= set(range(40))


def test_size_only_streaming_would_have_served_the_changed_pixels(public_shards):
    """The control: the same corruption passes a size check and silently changes example 25."""
    folder, images = public_shards
    got = {}
    for x, _ in stream_loader(folder, batch_size=1, shuffle_buffer=0, verify="size"):
        got[int(index_of(x)[0])] = x
    assert sorted(got) == list(range(40))
    want = torch.from_numpy(images[25].astype(np.float32) / 127.5 - 1.0)
    assert not torch.equal(got[25][0, 0], want)
    assert torch.equal(got[24][0, 0], torch.from_numpy(images[24].astype(np.float32) / 127.5 - 1.0))


def test_public_stream_refuses_the_corrupt_shard(public_shards):
    from dpldm.data.public import PublicStream

    folder, _ = public_shards
    kw = dict(batch_size=4, channels=1, image_size=16, num_classes=4, shuffle_buffer=0)
    with pytest.raises(ShardError, match=r"shard-000002\.tar.*sha256 differs"):
        stream = PublicStream(folder, **kw)
        for _ in range(20):  # 10 batches an epoch: the corrupt shard is met within two epochs
            stream.next()


def test_public_stream_opens_its_first_shard_at_construction(tmp_path):
    """pretrain-ae builds the stream before it writes its run folder: a corrupt first shard is found
    there. The batch read at construction is the first next() gives, and `position` counts it only then."""
    from dpldm.data.public import PublicStream

    images, labels, meta = indexed_images(40, shape=(16, 16), num_classes=4)
    import_arrays(images, labels, meta, tmp_path / "pub", shard_size=40)  # one shard
    kw = dict(batch_size=4, channels=1, image_size=16, num_classes=4, shuffle_buffer=0)
    s = PublicStream(tmp_path / "pub", **kw)
    assert s.position == (0, 0)
    first = index_of(s.next()[0]).tolist()
    assert first == [0, 1, 2, 3] and s.position == (0, 1)  # stored order (one shard, no shuffle buffer)
    assert index_of(PublicStream(tmp_path / "pub", position=(0, 1), **kw).next()[0]).tolist() == [4, 5, 6, 7]
    _flip_pixels(tmp_path / "pub", images, 30, "shard-000000.tar")
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*sha256 differs"):
        PublicStream(tmp_path / "pub", **kw)


def test_manifest_without_sha256_is_refused(env, tmp_path):
    folder = tmp_path / "nosha"
    shutil.copytree(env.images, folder)
    for name in ("manifest.json", "index.json"):
        d = json.loads((folder / name).read_text())
        for s in d["shards" if name == "manifest.json" else "shardlist"]:
            s["sha256"] = ""
        (folder / name).write_text(json.dumps(d))
    with pytest.raises(ShardError, match=r"malformed manifest: shard shard-000000\.tar has no sha256"):
        open_shard_folder(folder)
