"""Exponential moving average of model weights, on top of torch.optim.swa_utils.AveragedModel.

The first `update` copies the weights; later ones do ema = decay * ema + (1 - decay) * w over
parameters and buffers. `state_dict()` holds the averaged model's weights (plain names) and the
update count, so checkpoints stay flat.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (use it for sampling)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged.item())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

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
