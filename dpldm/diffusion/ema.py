"""Exponential moving average of model weights, on top of torch.optim.swa_utils.AveragedModel.

The first `update` copies the weights; the n-th later one does ema = d_n * ema + (1 - d_n) * w over
parameters and buffers, with the warm-up of CompVis' LitEma: d_n = min(decay, (1 + n) / (10 + n)).
Without it a 0.9995 EMA of a 4000-step run still holds e^-2 = 13.5% of the first weights and
samples noise (docs/pretraining.md, "v2 on the CPU"). `state_dict()` holds the averaged model's
weights (plain names) and the update count, so checkpoints stay flat; `restart()` makes the next
update copy the weights again (pretrain-ldm --restart-ema).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (use it for sampling)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged.item())

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update after the copy (n >= 1)."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = self.decay_at(int(n.item()))  # AveragedModel passes the count before this update
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)  # integer buffers (counters) follow the model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def restart(self) -> None:
        """Forget the average: the next update copies the model's weights."""
        self.averaged.n_averaged.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        state["__n_averaged__"] = self.averaged.n_averaged.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        n = state.pop("__n_averaged__", None)
        self.module.load_state_dict(state)
        if n is not None:
            self.averaged.n_averaged.copy_(n)
