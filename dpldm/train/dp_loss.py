"""The per-example loss that DP fine-tuning differentiates: what `DPStep` calls for every chunk.

    loss_fn(unet, ChunkBatch(z0, y, idx, step)) -> (B,) fp32

z0 are the cached UNSCALED latents (posterior means); they are scaled by the public model's
scale factor here. Each example's K timesteps, K noises and its label drop come from
`dpldm.train.draws` keyed on (secret seed, step, example index), so the loss of example i does
not depend on the rest of its chunk, the chunking, or the rank that computes it.

Precision: "bf16" runs the UNet forward under torch.autocast(bfloat16) (the backward follows the
recorded dtypes); parameters stay fp32, the loss is returned in fp32, and the DP engine computes
per-example norms, clipping factors, accumulators and noise in fp32.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dpldm.diffusion.loss import per_example_loss
from dpldm.diffusion.schedule import DiffusionSchedule
from dpldm.train.draws import per_example_draws

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class ChunkBatch:
    z0: torch.Tensor  # (B, Z, h, w) unscaled latents (CPU or device)
    y: torch.Tensor  # (B,) labels
    idx: torch.Tensor  # (B,) global example indices (sorted)
    step: int  # logical step


def autocast_context(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class DiffusionDPLoss:
    def __init__(self, schedule: DiffusionSchedule, *, scale_factor: float, timesteps_per_example: int,
                 cond_drop_prob: float, seed: int, device: torch.device, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.schedule, self.scale = schedule, float(scale_factor)
        self.K, self.drop_prob = int(timesteps_per_example), float(cond_drop_prob)
        self.seed, self.device, self.precision = int(seed), device, precision

    def __call__(self, unet: nn.Module, batch: ChunkBatch) -> torch.Tensor:
        z0 = batch.z0.to(self.device, torch.float32) * self.scale  # (B, Z, h, w)
        t, noise, drop = per_example_draws(batch.idx, batch.step, self.seed, self.K, tuple(z0.shape[1:]),
                                           self.schedule.num_timesteps, self.drop_prob)
        y = torch.where(drop, torch.full_like(batch.y, unet.null_class), batch.y).to(self.device)  # (B,)
        with autocast_context(self.device, self.precision):
            loss = per_example_loss(unet, z0, y, self.schedule, self.K, t=t.to(self.device),
                                    noise=noise.to(self.device))  # (B,)
        return loss.float()
