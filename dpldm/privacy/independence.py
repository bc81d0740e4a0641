"""Per-example independence, checked rather than assumed (hand-written: no library offers it).

DP-SGD's bound (adding one example moves a step's clipped sum by at most C) holds only if each
example's loss depends on that example alone. A model that mixes the rows of a batch
(`h - h.mean(0)`, batch statistics, attention across the batch dimension, a loss normalised by
another example) breaks it silently: every per-example norm is still clipped to C, but example
j's clipped gradient now moves when example i is added. Nothing in the layer rules can see such
a mix, so the engine's set-up probe runs this test on a PUBLIC batch of two or more examples:

    the clipped sum of the whole batch  ==  the sum of the clipped sums of each example alone

(up to floating-point rounding: a tolerance of `RTOL` x C per example). A model that fails is
refused before any private data is read. A mix whose effect on this public batch is below the
tolerance is not caught; the rule is stated in docs/api.md ("each example's loss must depend on
that example alone").
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from dpldm.privacy.batches import batch_size_of, select_rows

RTOL = 1e-3  # allowed |batch sum - sum of singles| per example, as a fraction of C (fp32: ~1e-6 measured)
RTOL_LOW_PRECISION = 2e-2  # bf16 / fp16 autocast forwards


class ExampleMixingError(ValueError):
    """The model's per-example losses are not independent of each other (module docstring)."""


def check_independence(clipped_sums: Callable[[Any], dict[str, torch.Tensor]], batch: Any, max_grad_norm: float,
                       *, low_precision: bool = False, where: str = "set-up probe") -> float:
    """Refuse (ExampleMixingError) when the clipped sum of `batch` differs from the sum of its
    examples' clipped sums computed one at a time; returns the largest difference / C."""
    size = batch_size_of(batch)
    if size is None or size < 2:
        raise ValueError(f"check_independence needs a batch of >= 2 examples ({where}), got {size}")
    together = {n: s.detach().double() for n, s in clipped_sums(batch).items()}
    alone = {n: torch.zeros_like(s) for n, s in together.items()}
    for i in range(size):
        for n, s in clipped_sums(select_rows(batch, torch.tensor([i]), size)).items():
            alone[n] += s.detach().double()
    diff = torch.sqrt(sum(((together[n] - alone[n]) ** 2).sum() for n in together)).item()
    ratio = diff / max_grad_norm
    tol = (RTOL_LOW_PRECISION if low_precision else RTOL) * size
    if not ratio <= tol:  # also catches NaN
        raise ExampleMixingError(
            f"the model mixes examples ({where}): on a public batch of {size} examples, the clipped gradient sum "
            f"differs from the sum of each example's clipped gradient computed alone by {ratio:.3g} C (tolerance "
            f"{tol:.2g} C). DP-SGD needs each example's loss to depend on that example alone; remove batch-level "
            "operations (h - h.mean(0), batch statistics, attention or normalisation across the batch dimension)")
    return ratio
