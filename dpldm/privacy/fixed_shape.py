"""Fixed-shape private steps: every logical step runs the same physical chunks, whatever the
realised Poisson batch (hand-written: the truncation bound and its delta are ours).

Why: a step's duration grows with its realised batch |S|, a private count; file times, wandb's
runtime, a progress bar or a log line would carry it out of the run. With fixed shapes each step
processes exactly `max_batch` example slots, in `num_chunks` chunks of `rows` slots:

    |S| <= max_batch:  the sample's examples, then padding slots (a public dummy, clipping factor 0)
    |S| >  max_batch:  a uniformly random subset of max_batch examples (keyed on the secret plan
                       seed and the step) -- truncated Poisson sampling (Chua et al. 2024)

Truncation is accounted, not assumed away: with X ~ Binomial(N + 1, q) (the larger of two
neighbouring data sets), p = P(X > max_batch) per step. On the event that no step truncates, the
run IS the untruncated Poisson mechanism; so for any output set E,
P[M'(D) in E] <= e^eps P[M'(D') in E] + delta + T p (1 + e^eps), and the run is
(eps, delta + delta_truncation)-DP with delta_truncation = T p (1 + e^eps). `max_batch` is the
smallest size for which delta_truncation <= truncation_delta * delta (default 1e-3 * delta:
about 7-8 standard deviations above q*N at the demo's settings), so the reported delta grows by at
most 0.1%. The cost is compute: max_batch / (q*N) example slots per expected example (1.21 at the
demo's q*N = 1000; it falls as q*N grows: bench/fixed_shape.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FixedShape:
    max_batch: int  # example slots per logical step (public)
    num_chunks: int  # physical chunks per logical step (public)
    rows: int  # slots per chunk (public): num_chunks * rows >= max_batch
    truncation_probability: float  # per step, P(Binomial(N+1, q) > max_batch)
    delta_truncation: float  # T p (1 + e^eps): added to the run's delta

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def truncation_tail(num_examples: int, sample_rate: float, bound: int) -> float:
    """P(Binomial(N + 1, q) > bound): the neighbouring data set with one more example."""
    from scipy.stats import binom

    return float(binom.sf(bound, num_examples + 1, sample_rate))


def plan_fixed_shape(num_examples: int, sample_rate: float, steps: int, epsilon: float, delta: float,
                     physical_batch_size: int, truncation_delta: float = 1e-3) -> FixedShape:
    """The smallest max_batch with T p (1 + e^eps) <= truncation_delta * delta, cut into
    ceil(max_batch / P) chunks of equal size."""
    if not 0 < truncation_delta <= 0.1:
        raise ValueError(f"truncation_delta must lie in (0, 0.1] (a fraction of delta), got {truncation_delta}")
    budget = truncation_delta * delta
    factor = steps * (1.0 + math.exp(min(epsilon, 700.0)))
    lo, hi = max(0, math.floor(sample_rate * (num_examples + 1))), num_examples + 1  # tail(N + 1) = 0
    while lo < hi:  # the smallest bound whose accounted truncation fits the budget (the tail falls with it)
        mid = (lo + hi) // 2
        if factor * truncation_tail(num_examples, sample_rate, mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    max_batch = max(lo, 1)
    num_chunks = -(-max_batch // physical_batch_size)
    rows = -(-max_batch // num_chunks)
    p = truncation_tail(num_examples, sample_rate, max_batch)
    return FixedShape(max_batch=max_batch, num_chunks=num_chunks, rows=rows, truncation_probability=p,
                      delta_truncation=factor * p)


def fixed_chunks(sample: torch.Tensor, shape: FixedShape, seed: int, step: int) -> tuple[list[torch.Tensor], int]:
    """The global sample (sorted) as `shape.num_chunks` chunks of at most `shape.rows` examples,
    after truncation to `shape.max_batch` (a random subset keyed on (seed, step)); returns the
    chunks and the number of examples dropped (private: never logged)."""
    dropped = max(0, int(sample.numel()) - shape.max_batch)
    if dropped:
        g = torch.Generator().manual_seed((int(seed) ^ 0x5F3759DF_2545F491 ^ (int(step) * 0x9E3779B97F4A7C15)) % 2**63)
        keep = torch.randperm(int(sample.numel()), generator=g)[:shape.max_batch]
        sample = sample[keep.sort().values]
    return list(torch.tensor_split(sample, shape.num_chunks)), dropped
