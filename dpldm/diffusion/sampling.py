"""Our own samplers: DDPM ancestral sampling and DDIM (eta), with classifier-free guidance.

Runs sample with diffusers' schedulers (`dpldm.diffusion.schedulers.sample`); `ddpm_sample` is
the "ddpm" sampler there, and `ddim_sample` the float64 reference its DDIM is tested against.

Guidance: eps = eps_uncond + w * (eps_cond - eps_uncond); w = 1 is the plain conditional
prediction (and skips the unconditional pass), w = 0 the unconditional one.
Noise can be passed explicitly (`x_T`, and `noise` with one tensor per step) so tests can fix it;
otherwise it is drawn from `generator`. Step i of either sampler uses `noise[i]`; the last step
(t = 0) adds no noise. With eta = 1 and steps = T, DDIM is exactly DDPM ancestral sampling.
"""
from __future__ import annotations

import torch
from torch import nn

from dpldm.diffusion.schedule import DiffusionSchedule


def combine_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guided noise prediction; x (B, C, h, w), t (B,), y (B,) -> (B, C, h, w)."""
    if scale == 1.0:
        return unet(x, t, y)
    null = torch.full_like(y, unet.null_class)
    eps = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, h, w)
    eps_cond, eps_uncond = eps.chunk(2)
    return combine_guidance(eps_uncond, eps_cond, scale)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps spaced uniformly over [0, T-1], descending (T-1 first, 0 last)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling: steps must lie in [1, {num_timesteps}], got {steps}")
    ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()
    return ts.flip(0).tolist()


def _noise_source(shape: tuple[int, ...], noise: torch.Tensor | None, generator: torch.Generator | None,
                  device: torch.device, dtype: torch.dtype):
    def draw(i: int) -> torch.Tensor:
        if noise is not None:
            return noise[i].to(device, dtype)
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device, dtype)
    return draw


@torch.no_grad()
def ddpm_sample(unet: nn.Module, schedule: DiffusionSchedule, y: torch.Tensor, shape: tuple[int, ...],
                guidance_scale: float = 1.0, x_T: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling over all T steps with the posterior variance beta_tilde; returns x_0."""
    device = y.device
    draw = _noise_source(shape, noise, generator, device, torch.float32)
    x = x_T.to(device, torch.float32) if x_T is not None else draw_initial(shape, generator, device)  # (B, C, h, w)
    T = schedule.num_timesteps
    for i, t in enumerate(range(T - 1, -1, -1)):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = guided_eps(unet, x, tt, y, guidance_scale)  # (B, C, h, w)
        beta, alpha = schedule.betas[t].item(), schedule.alphas[t].item()
        abar = schedule.alphas_cumprod[t].item()
        mean = (x - (beta / (1 - abar) ** 0.5) * eps) / alpha ** 0.5
        x = mean + schedule.posterior_variance[t].item() ** 0.5 * draw(i) if t > 0 else mean
    return x


@torch.no_grad()
def ddim_sample(unet: nn.Module, schedule: DiffusionSchedule, y: torch.Tensor, shape: tuple[int, ...],
                steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0, x_T: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                timesteps: list[int] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) over `steps` uniformly spaced timesteps (or the descending `timesteps`
    given); eta = 0 is deterministic. The reference for diffusers' DDIMScheduler (tests)."""
    device = y.device
    draw = _noise_source(shape, noise, generator, device, torch.float32)
    x = x_T.to(device, torch.float32) if x_T is not None else draw_initial(shape, generator, device)  # (B, C, h, w)
    ts = ddim_timesteps(schedule.num_timesteps, steps) if timesteps is None else [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        abar = schedule.alphas_cumprod[t].item()
        abar_prev = schedule.alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = guided_eps(unet, x, tt, y, guidance_scale)  # (B, C, h, w)
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * draw(i)
    return x


def draw_initial(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)
