"""Noise schedules. Tables are float64; values gathered for a batch are cast to its dtype.

"linear" is the LDM schedule: betas linear in sqrt-space between beta_start and beta_end,
beta_t = (sqrt(b0) + t/(T-1) * (sqrt(b1) - sqrt(b0)))^2. "cosine" is Nichol & Dhariwal (2021)
with s = 0.008 and betas clipped at 0.999.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpldm.config import DiffusionConfig


def make_betas(kind: str, timesteps: int, beta_start: float = 0.0015, beta_end: float = 0.0195) -> torch.Tensor:
    """(T,) float64 betas."""
    if kind == "linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T+1,)
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"diffusion.schedule: unknown schedule {kind!r} (linear | cosine)")


@dataclass
class DiffusionSchedule:
    """alpha-bar tables for a discrete-time DDPM with T steps (t = 0..T-1)."""

    betas: torch.Tensor  # (T,) float64

    def __post_init__(self) -> None:
        self.betas = self.betas.to(torch.float64)
        if self.betas.ndim != 1 or not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("DiffusionSchedule: betas must be a 1-D tensor in (0, 1)")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # variance of q(x_{t-1} | x_t, x_0)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "DiffusionSchedule":
        return cls(make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against `like` (B, ...), in like's dtype."""
        vals = table.to(t.device)[t]  # (B,)
        return vals.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise (B, ...), t (B,)."""
        a = self.gather(self.alphas_cumprod.sqrt(), t, x0)
        s = self.gather((1 - self.alphas_cumprod).sqrt(), t, x0)
        return a * x0 + s * noise
