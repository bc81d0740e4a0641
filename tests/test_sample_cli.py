"""`dpldm sample`: the grid, and labelled sets (npz, png-dir) that `dpldm evaluate` reads as they are.

References: each sample is recomputed one at a time (batch of one) with the library's DDIM and
decoder from its own x_T; `dpldm evaluate`'s own loader reads what the command wrote."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dpldm.cli import main
from dpldm.diffusion.sampling import ddim_sample
from dpldm.eval.cli import load_images
from dpldm.models.ldm import load_ldm
from tiny_ldm import save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sample") / "model")


def sample(model, out, *extra):
    return main(["sample", "--checkpoint", str(model), "--out", str(out), "--device", "cpu", "--steps", "3",
                 "--guidance", "2", *extra])


def leading(T, steps):
    """The "leading" timesteps of diffusers' DDIMScheduler ((n-1-i) * (T//n)), computed here."""
    return [(steps - 1 - i) * (T // steps) for i in range(steps)]


def reference(model, labels, seed=0, steps=3, guidance=2.0):
    """uint8 (N, 16, 16): sample i alone, from x_T = randn of generator (seed << 32) + i, by our own DDIM (the
    reference for diffusers' DDIMScheduler that `dpldm sample` runs)."""
    ldm = load_ldm(model)
    out = []
    for i, y in enumerate(labels):
        x_T = torch.randn(ldm.latent_shape, generator=torch.Generator().manual_seed((seed << 32) + i))[None]
        z = ddim_sample(ldm.ema.module, ldm.schedule, torch.tensor([int(y)]), (1, *ldm.latent_shape), steps, 0.0,
                        guidance, x_T=x_T, timesteps=leading(ldm.schedule.num_timesteps, steps))
        img = ldm.decode(z)[0, 0]  # (16, 16) in [-1, 1]
        out.append(((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(out)


def test_npz_is_what_evaluate_reads_and_matches_per_sample_reference(model, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert sample(model, out, "--format", "npz", "--per-class", "3", "--classes", "0,2,4", "--batch-size", "4") == 0
    images, labels = load_images(str(out), "--samples")  # dpldm evaluate's loader
    assert images.dtype == np.uint8 and images.shape == (9, 16, 16)
    assert labels.tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    want = reference(model, labels)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1  # batch 4 vs 1: float rounding only
    assert images.std() > 1  # not a constant (black) image
    with np.load(out, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
    assert meta["steps"] == 3 and meta["guidance"] == 2.0 and meta["per_class"] == 3
    assert "wrote 9 samples" in capsys.readouterr().out


def test_png_dir_equals_npz_and_batch_size_does_not_change_samples(model, tmp_path):
    assert sample(model, tmp_path / "a.npz", "--format", "npz", "--per-class", "2", "--batch-size", "1") == 0
    assert sample(model, tmp_path / "dir", "--format", "png-dir", "--per-class", "2", "--batch-size", "5") == 0
    a, la = load_images(str(tmp_path / "a.npz"), "--samples")
    b, lb = load_images(str(tmp_path / "dir"), "--samples")
    assert la.tolist() == lb.tolist() == [0, 0, 1, 1, 2, 2]  # default classes: the private ones (data.num_classes=3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [".dpldm-output.json", "0", "1", "2", "samples.json"]
    assert sorted(p.name for p in (tmp_path / "dir" / "1").iterdir()) == ["000002.png", "000003.png"]
    assert Image.open(tmp_path / "dir" / "1" / "000002.png").mode == "L"
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "dir"]  # no temporary left behind


def test_grid_mode_is_kept(model, tmp_path):
    out = tmp_path / "grid.png"
    assert sample(model, out, "--classes", "0,3", "--n", "3", "--upscale", "1") == 0
    assert np.asarray(Image.open(out)).shape == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)


def test_existing_output_needs_overwrite(model, tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"mine")
    assert sample(model, out, "--format", "npz", "--per-class", "1") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert sample(model, out, "--format", "npz", "--per-class", "1", "--overwrite") == 2  # not dpldm's file
    assert "was not written by `dpldm sample --format npz`" in capsys.readouterr().err and out.read_bytes() == b"mine"
    out.unlink()
    assert sample(model, out, "--format", "npz", "--per-class", "2") == 0
    assert sample(model, out, "--format", "npz", "--per-class", "1", "--overwrite") == 0  # dpldm's own npz: replaced
    assert load_images(str(out), "--samples")[0].shape == (3, 16, 16)
    grid = tmp_path / "g.png"
    assert sample(model, grid, "--per-class", "1") == 0
    assert Image.open(grid).info.get("dpldm") == "sample-grid"  # the tag that --overwrite looks for
    assert sample(model, grid, "--per-class", "2", "--overwrite") == 0
    Image.new("L", (4, 4)).save(grid)  # the user's own PNG at that path now
    assert sample(model, grid, "--per-class", "1", "--overwrite") == 2
    assert "was not written by `dpldm sample --format grid`" in capsys.readouterr().err
    grid.unlink()
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert sample(model, folder, "--format", "png-dir", "--per-class", "1") == 2
    assert (folder / "keep.txt").read_text() == "x"
    assert sample(model, folder, "--format", "png-dir", "--per-class", "1", "--overwrite") == 2  # not dpldm's folder
    assert sorted(os.listdir(folder)) == ["keep.txt"] and (folder / "keep.txt").read_text() == "x"
    (folder / "keep.txt").unlink()
    assert sample(model, folder, "--format", "png-dir", "--per-class", "1", "--overwrite") == 0  # empty: nothing lost
    assert sample(model, folder, "--format", "png-dir", "--per-class", "1", "--classes", "1", "--overwrite") == 0
    assert load_images(str(folder), "--samples")[1].tolist() == [1]  # dpldm's own png-dir: replaced
    assert sorted(os.listdir(tmp_path)) == ["dir", "s.npz"]


@pytest.mark.parametrize("fmt,out_name", [("npz", "s.npz"), ("png-dir", "dir")])
def test_a_failed_write_leaves_nothing(model, tmp_path, monkeypatch, fmt, out_name):
    import PIL.Image

    calls = {"n": 0}
    real_save = PIL.Image.Image.save

    def failing_save(self, fp, *a, **k):  # the 3rd image fails (png-dir)
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        sample(model, tmp_path / out_name, "--format", fmt, "--per-class", "2")
    assert os.listdir(tmp_path) == []


def test_ddpm_and_guidance_edges(model, tmp_path):
    """--guidance 0 (unconditional) and --steps = T are valid; ddpm runs all T steps."""
    assert sample(model, tmp_path / "g0.npz", "--format", "npz", "--per-class", "1", "--guidance", "0",
                  "--steps", "20") == 0
    want = reference(model, [0, 1, 2], steps=20, guidance=0.0)
    got = load_images(str(tmp_path / "g0.npz"), "--samples")[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert main(["sample", "--checkpoint", str(model), "--out", str(tmp_path / "d.npz"), "--format", "npz",
                 "--per-class", "1", "--sampler", "ddpm"]) == 0
