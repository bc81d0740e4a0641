"""Poisson sampling plan: inclusion frequency q (binomial tests), varying and empty batches."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest

from dpldm.privacy import PoissonPlan

N, Q, STEPS = 300, 0.07, 400


def _counts(plan):
    counts = torch.zeros(N, dtype=torch.long)
    sizes = []
    for s in range(STEPS):
        idx = plan.indices(s)
        assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
        assert idx.unique().numel() == idx.numel()
        counts[idx] += 1
        sizes.append(idx.numel())
    return counts, sizes


def test_inclusion_frequency_matches_q():
    counts, sizes = _counts(PoissonPlan(N, Q, seed=123))
    total = int(counts.sum())
    assert binomtest(total, N * STEPS, Q).pvalue > 1e-3  # pooled over examples and steps
    # every example on its own: Binomial(STEPS, Q); Bonferroni over the N examples
    pmin = min(binomtest(int(c), STEPS, Q).pvalue for c in counts)
    assert pmin > 1e-3 / N
    # batch sizes are Binomial(N, Q): they vary (a fixed-size shuffled batch would not)
    assert len(set(sizes)) > 8
    assert binomtest(sum(sizes), N * STEPS, Q).pvalue > 1e-3


def test_independent_of_other_examples_and_steps():
    """Inclusion of example 0 at step s is independent of example 1 and of step s+1 (2x2 tables)."""
    plan = PoissonPlan(N, 0.5, seed=5)
    rows = torch.stack([torch.isin(torch.arange(N), plan.indices(s)) for s in range(STEPS)]).float()  # (S, N)
    both_examples = (rows[:, 0::2] * rows[:, 1::2]).mean()
    both_steps = (rows[:-1] * rows[1:]).mean()
    for p in (both_examples, both_steps):
        assert abs(float(p) - 0.25) < 0.01


def test_empty_batches_happen_and_are_empty_tensors():
    plan = PoissonPlan(20, 0.02, seed=1)
    empties = [s for s in range(300) if plan.indices(s).numel() == 0]
    assert len(empties) > 100  # (0.98^20 = 0.67)
    assert plan.indices(empties[0]).shape == (0,)


def test_plan_is_a_pure_function_of_seed_and_step():
    a, b = PoissonPlan(N, Q, seed=9), PoissonPlan.from_state_dict(PoissonPlan(N, Q, seed=9).state_dict())
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in (0, 5, 77))
    assert not torch.equal(a.indices(0), PoissonPlan(N, Q, seed=10).indices(0))
    assert PoissonPlan(N, Q).seed != PoissonPlan(N, Q).seed  # OS seed by default


def test_rank_shares_partition_the_sample():
    idx = PoissonPlan(N, 0.3, seed=2).indices(0)
    shares = [PoissonPlan.rank_share(idx, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shares).sort().values, idx)
    assert max(s.numel() for s in shares) - min(s.numel() for s in shares) <= 1


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_bad_rate_refused(q):
    with pytest.raises(ValueError, match="sample rate"):
        PoissonPlan(N, q)
