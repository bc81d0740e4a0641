"""Fixed-shape private steps (issue 28 item 1; dpldm.privacy.fixed_shape): every step runs the same
chunks whatever the realised Poisson batch, padding contributes nothing, the neighbouring bound holds,
and the truncation is accounted in delta. References: an exact binomial tail in float64 log space,
a plain (not fixed-shape) DPStep on the same examples, a per-example autograd loop."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dpldm.parallel.step import run_logical_step
from dpldm.privacy.accountant import PrivacyLedger
from dpldm.privacy.dp_step import DPStep
from dpldm.privacy.fixed_shape import fixed_chunks, plan_fixed_shape
from dpldm.privacy.sampler import PoissonPlan
from dpldm.train.dp_finetune import FinetuneOptions, train
import test_privacy_path
from test_privacy_path import cfg_for

world = test_privacy_path.world  # the fixture, shared with test_privacy_path


def binom_tail(n: int, q: float, bound: int) -> float:
    """P(Binomial(n, q) > bound) by summing the pmf in log space (float64), no scipy."""
    k = np.arange(bound + 1, n + 1)
    if k.size == 0:
        return 0.0
    logpmf = (np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
              + k * math.log(q) + (n - k) * math.log1p(-q))
    return float(np.exp(logpmf).sum())


@pytest.mark.parametrize("N,q,T,eps,P", [(4000, 0.25, 100, 10.0, 125), (4000, 0.25, 100, 1.0, 125),
                                         (500, 0.05, 300, 5.0, 16), (40, 0.2, 6, 5.0, 3)])
def test_max_batch_is_the_smallest_size_whose_truncation_fits_the_delta_budget(N, q, T, eps, P):
    delta, share = 1e-5, 1e-3
    fs = plan_fixed_shape(N, q, T, eps, delta, P, share)
    factor = T * (1 + math.exp(eps))
    assert factor * binom_tail(N + 1, q, fs.max_batch) <= share * delta * (1 + 1e-6)
    assert factor * binom_tail(N + 1, q, fs.max_batch - 1) > share * delta
    assert fs.truncation_probability == pytest.approx(binom_tail(N + 1, q, fs.max_batch), rel=1e-6, abs=1e-300)
    assert fs.num_chunks == math.ceil(fs.max_batch / P) and fs.rows * fs.num_chunks >= fs.max_batch
    assert fs.rows <= P and fs.max_batch > q * N  # a real margin above the expected batch


def test_fixed_chunks_truncate_to_a_secret_random_subset():
    fs = plan_fixed_shape(200, 0.5, 10, 1.0, 1e-5, 16)
    big = torch.arange(0, 200, dtype=torch.long)  # |S| = 200 > max_batch: truncated
    chunks, dropped = fixed_chunks(big, fs, seed=7, step=3)
    kept = torch.cat(chunks)
    assert len(chunks) == fs.num_chunks and max(c.numel() for c in chunks) <= fs.rows
    assert dropped == 200 - fs.max_batch and kept.numel() == fs.max_batch
    assert kept.unique().numel() == kept.numel() and bool((kept[1:] > kept[:-1]).all())  # a sorted subset
    again, _ = fixed_chunks(big, fs, seed=7, step=3)
    other, _ = fixed_chunks(big, fs, seed=7, step=4)
    assert torch.equal(torch.cat(again), kept) and not torch.equal(torch.cat(other), kept)
    small = torch.tensor([3, 9, 11])
    chunks, dropped = fixed_chunks(small, fs, seed=7, step=3)
    assert dropped == 0 and torch.equal(torch.cat(chunks), small) and len(chunks) == fs.num_chunks


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.shapes: list[int] = []

    def forward(self, x):
        self.shapes.append(int(x.shape[0]))
        return self.lin(x)


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).sum(1)  # (B,)


def _dp(data_x, data_y, fixed: bool, q=0.3, C=0.1, seed=0):
    torch.manual_seed(0)
    model = _Model().double()
    plan = PoissonPlan(num_examples=len(data_x), sample_rate=q, seed=seed)
    ledger = PrivacyLedger(plan=plan, noise_multiplier=0.0 + 1e-9, max_grad_norm=C, delta=1e-3)
    fs = plan_fixed_shape(len(data_x), q, 20, 5.0, 1e-3, 4) if fixed else None
    dp = DPStep(model, _loss, ledger, physical_batch_size=4, acc_dtype=torch.float64, fixed_shape=fs)
    dp.noise.draw = lambda tensors, std, step, dtype: [torch.zeros_like(t) for t in tensors]  # noise-free sums
    return model, dp


def _load(data_x, data_y):
    return lambda idx: (data_x[idx], data_y[idx])


def test_every_step_runs_the_same_shapes_whatever_the_realised_batch():
    """Counts and shapes per step are a function of public constants only (times follow them)."""
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    model, dp = _dp(x, y, fixed=True)
    per_step, sizes = [], []
    for _ in range(12):
        model.shapes.clear()
        stats = run_logical_step(dp, _load(x, y))
        per_step.append(list(model.shapes))
        sizes.append(stats["global"])
    assert len(set(sizes)) > 3  # the realised Poisson batch varies ...
    assert all(s == per_step[0] for s in per_step)  # ... the work does not
    assert per_step[0] == [dp.fixed_shape.rows] * dp.fixed_shape.num_chunks
    model2, plain = _dp(x, y, fixed=False)
    shapes = []
    for _ in range(12):
        model2.shapes.clear()
        run_logical_step(plain, _load(x, y))
        shapes.append(sum(model2.shapes))
    assert len(set(shapes)) > 3  # the control: without fixed shapes the work follows |S|


def test_padding_adds_nothing_and_the_neighbour_bound_holds():
    x, y = torch.randn(31, 3, dtype=torch.float64), torch.randn(31, 2, dtype=torch.float64)
    for step_count in range(4):
        sums = {}
        for name, fixed, n in (("fixed", True, 30), ("plain", False, 30), ("fixed+1", True, 31)):
            model, dp = _dp(x[:n], y[:n], fixed=fixed)
            dp.ledger.plan = PoissonPlan(num_examples=30, sample_rate=0.3, seed=0)  # same sample for the first 30
            for _ in range(step_count):
                dp.ledger.step()
            dp.begin_step()
            rows = dp.chunk_rows
            for idx in dp.my_chunks:
                b = _load(x, y)(idx)
                if rows is not None:
                    from dpldm.privacy.batches import pad_rows
                    dp.accumulate(pad_rows(b, idx.numel(), rows), example_mask=torch.arange(rows) < idx.numel())
                else:
                    dp.accumulate(b)
            sums[name] = torch.cat([t.flatten() for t in dp.acc.values()]).clone()
            dp.phase = "idle"
        torch.testing.assert_close(sums["fixed"], sums["plain"], rtol=1e-12, atol=1e-12)
        # the neighbour (example 30 added, same plan for the rest): moved by its own clipped gradient, <= C
        assert float((sums["fixed+1"] - sums["fixed"]).norm()) <= 0.1 * (1 + 1e-9)


def test_private_run_reports_the_fixed_shape_and_the_accounted_delta(world, tmp_path):  # noqa: F811
    out = tmp_path / "fixed"
    res = train(cfg_for(world, out, "privacy.steps=3", "train.wandb=false", "privacy.backend=\"torch\""),
                FinetuneOptions(out=out, init=str(world["public"]), verbose=False))
    rep = res["privacy"]
    fs = rep["fixed_shape"]
    assert fs and fs["max_batch"] > rep["expected_batch_size"]
    p = binom_tail(rep["num_examples"] + 1, rep["sample_rate"], fs["max_batch"])
    want = rep["executed_steps"] * p * (1 + math.exp(rep["epsilon"]))
    assert rep["delta_truncation"] == pytest.approx(want, rel=1e-6) and 0 < want <= 1e-3 * rep["delta"]
    assert rep["delta_total"] == pytest.approx(rep["delta"] + want)
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["privacy"]["fixed_shape"] == fs and meta["privacy"]["delta_total"] == rep["delta_total"]
