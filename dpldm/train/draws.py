"""Per-example diffusion randomness of DP fine-tuning: a pure function of (secret seed, step, example).

Each private example i at logical step s gets its own generator, seeded by a hash of
(seed, s, i). Its K timesteps, K noises and its label drop (classifier-free guidance) come from
that generator alone, so they do not depend on which other examples were sampled, how the
sample was cut into physical chunks, or how many ranks share it. This is what makes the
neighbouring-dataset property hold on the trainer's real loss: adding one example to the data
set changes the step's clipped sum only by that example's own clipped gradient (<= C), the
other examples' terms are bit-for-bit unchanged (tests/test_dp_neighbouring.py).

The seed is SECRET (drawn from the OS for a private run, kept only in the mode-0600 step
checkpoints): whoever knows it and the public model can recompute every draw. A run seeded from
the config (`train.deterministic`) is therefore reported as not private.

Drawn on the CPU (bit-identical on every machine and device), then moved to the device: a few
KB per example, small next to the UNet's forward.
"""
from __future__ import annotations

import secrets

import torch

_MASK64 = (1 << 64) - 1
_STREAM = 0x5EED_D1FF_0000_0004  # distinct from the Poisson plan's and the noise's seeding


def _splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for example `index` at logical step `step`; chained hashing, no collisions
    between nearby (step, index) pairs as a linear mix would risk."""
    h = _splitmix64((int(seed) ^ _STREAM) & _MASK64)
    h = _splitmix64(h ^ (int(step) & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h >> 1


def new_secret_seed() -> int:
    """A fresh seed from the OS CSPRNG (private runs)."""
    return secrets.randbits(63)


def per_example_draws(idx: torch.Tensor, step: int, seed: int, K: int, shape: tuple[int, ...], num_timesteps: int,
                      drop_prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the examples `idx` (B,) at `step`: t (B*K,) int64, noise (B*K, *shape) fp32, drop (B,) bool.

    Rows i*K .. i*K+K-1 belong to example idx[i] (the layout of `per_example_loss`). One
    generator per example: t first, then the noise, then the drop."""
    B = int(idx.numel())
    t = torch.empty(B * K, dtype=torch.int64)
    noise = torch.empty((B * K, *shape), dtype=torch.float32)
    drop = torch.zeros(B, dtype=torch.bool)
    g = torch.Generator()
    for row, i in enumerate(idx.tolist()):
        g.manual_seed(example_seed(seed, step, i))
        t[row * K:(row + 1) * K] = torch.randint(0, num_timesteps, (K,), generator=g)
        noise[row * K:(row + 1) * K] = torch.randn((K, *shape), generator=g)
        drop[row] = bool(torch.rand((), generator=g) < drop_prob)
    return t, noise, drop
