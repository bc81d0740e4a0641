"""Epsilon-prediction loss with K timesteps/noises per example, averaged per example.

The K copies of example i are the contiguous rows i*K .. i*K+K-1 (`repeat_interleave`); the DP
engine regroups the B*K rows as one sequence per example relying on this layout.
"""
from __future__ import annotations

import torch
from torch import nn

from dpldm.diffusion.schedule import DiffusionSchedule


def draw_timesteps_and_noise(shape: torch.Size | tuple[int, ...], K: int, num_timesteps: int,
                             generator: torch.Generator | None = None,
                             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """t (B*K,) uniform in [0, T) and noise (B*K, ...) ~ N(0, I) for latents of `shape` (B, ...).
    Drawn t first, then noise, on the generator's device, then moved to `device`."""
    gen_device = generator.device if generator is not None else torch.device(device)
    n = shape[0] * K
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=gen_device)
    noise = torch.randn((n, *shape[1:]), generator=generator, device=gen_device)
    return t.to(device), noise.to(device)


def per_example_loss(unet: nn.Module, z0: torch.Tensor, y: torch.Tensor, schedule: DiffusionSchedule, K: int = 1,
                     generator: torch.Generator | None = None, cond_drop_prob: float = 0.0,
                     t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over K draws of ||eps - unet(x_t, t, y)||^2 / D per example: (B,).

    z0: (B, C, h, w) scaled latents; y: (B,) labels. `t` (B*K,) and `noise` (B*K, C, h, w) may be
    given explicitly (tests); otherwise they are drawn from `generator`. With cond_drop_prob > 0
    each row's label is replaced by the null class with that probability (classifier-free
    guidance training), drawn after t and noise.
    """
    if K < 1:
        raise ValueError(f"per_example_loss: K must be >= 1, got {K}")
    if y.shape != z0.shape[:1]:
        raise ValueError(f"per_example_loss: y must be (B,) = {tuple(z0.shape[:1])}, got {tuple(y.shape)}")
    B = z0.shape[0]
    if t is None or noise is None:
        t_drawn, noise_drawn = draw_timesteps_and_noise(z0.shape, K, schedule.num_timesteps, generator, z0.device)
        t = t_drawn if t is None else t
        noise = noise_drawn if noise is None else noise
    noise = noise.to(z0.dtype)
    z = z0.repeat_interleave(K, dim=0)  # (B*K, C, h, w): rows i*K..i*K+K-1 belong to example i
    labels = y.repeat_interleave(K, dim=0)  # (B*K,)
    if cond_drop_prob > 0:
        gen_device = generator.device if generator is not None else z0.device
        drop = torch.rand(B * K, generator=generator, device=gen_device).to(z0.device) < cond_drop_prob  # (B*K,)
        labels = torch.where(drop, torch.full_like(labels, unet.null_class), labels)
    x_t = schedule.q_sample(z, t, noise)  # (B*K, C, h, w)
    eps = unet(x_t, t, labels)  # (B*K, C, h, w)
    mse = (eps - noise).pow(2).flatten(1).mean(dim=1)  # (B*K,)
    return mse.view(B, K).mean(dim=1)  # (B,)
