"""Sampling with diffusers' schedulers driving our UNet (with classifier-free guidance).

    diffusion.sampler   diffusers class                  settings
    "ddim"              DDIMScheduler                    eta from diffusion.eta; the last step goes to alpha-bar 1
    "dpmpp-2m"          DPMSolverMultistepScheduler      DPM-Solver++ (2M): algorithm "dpmsolver++", order 2
    "unipc"             UniPCMultistepScheduler          UniPC-bh2, order 2 (predictor-corrector)

Every scheduler gets OUR betas (`trained_betas` = the schedule's table), so it integrates exactly
the process the UNet was trained on; diffusers keeps its tables in float32. The multistep solvers
use "trailing" timesteps (round(T - i*T/n) - 1: the first step starts from the last training
timestep, Lin et al. 2024). DDIM uses "leading" ones ((n-1-i) * (T//n), down to 0), the one
spacing for which diffusers' DDIMScheduler, which always steps from t to t - T//n, lands on the
next listed timestep for every (T, n). The DDIM of `dpldm.diffusion.sampling.ddim_sample`
(float64 tables) is kept as the reference the tests compare this one with on those timesteps. Only diffusers' code is used for the update rules; nothing
here re-implements a solver.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpldm.config import SAMPLERS
from dpldm.diffusion.sampling import ddpm_sample, guided_eps
from dpldm.diffusion.schedule import DiffusionSchedule

SCHEDULERS = ("ddim", "dpmpp-2m", "unipc")  # diffusers; SAMPLERS adds "ddpm" (ours: ancestral, all T steps)


def make_scheduler(name: str, schedule: DiffusionSchedule, steps: int):
    """A diffusers scheduler for `name` on `schedule`'s betas, with `steps` inference steps set."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common: dict[str, Any] = {"num_train_timesteps": schedule.num_timesteps,
                              "trained_betas": schedule.betas.float().tolist(), "prediction_type": "epsilon",
                              "timestep_spacing": "trailing"}
    if name == "ddim":  # "leading": see the module docstring
        sch = DDIMScheduler(**{**common, "timestep_spacing": "leading"}, clip_sample=False, set_alpha_to_one=True,
                            steps_offset=0)
    elif name == "dpmpp-2m":
        sch = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                          solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
    elif name == "unipc":
        sch = UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", predict_x0=True,
                                      lower_order_final=True, final_sigmas_type="zero")
    else:
        raise ValueError(f"sampling: unknown diffusers scheduler {name!r} ({' | '.join(SCHEDULERS)})")
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"sampling: steps must lie in [1, {schedule.num_timesteps}], got {steps}")
    sch.set_timesteps(steps)
    return sch


@torch.no_grad()
def scheduler_sample(unet: nn.Module, schedule: DiffusionSchedule, y: torch.Tensor, shape: tuple[int, ...],
                     sampler: str = "ddim", steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                     x_T: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents x_0 (B, C, h, w) for labels y (B,) from x_T (drawn from `generator` when not given).
    eta > 0 is DDIM only (its per-step noise comes from `generator`); the multistep solvers are
    deterministic given x_T."""
    if eta > 0 and sampler != "ddim":
        raise ValueError(f"sampling: eta = {eta} needs sampler 'ddim'; {sampler!r} is a deterministic solver")
    device = y.device
    sch = make_scheduler(sampler, schedule, steps)
    if x_T is None:
        gen_device = generator.device if generator is not None else device
        x_T = torch.randn(shape, generator=generator, device=gen_device)
    x = x_T.to(device, torch.float32) * sch.init_noise_sigma  # (B, C, h, w)
    extra = {"eta": eta, "generator": generator} if sampler == "ddim" else {}
    for t in sch.timesteps:
        tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        eps = guided_eps(unet, sch.scale_model_input(x, t), tt, y, guidance_scale).float()  # (B, C, h, w)
        x = sch.step(eps, t, x, **extra).prev_sample
    return x


def sample(unet: nn.Module, schedule: DiffusionSchedule, y: torch.Tensor, shape: tuple[int, ...], sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0, x_T: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Latent samples (B, C, h, w) for labels y (B,) with the named sampler (SAMPLERS)."""
    if sampler in SCHEDULERS:
        return scheduler_sample(unet, schedule, y, shape, sampler, steps, eta, guidance_scale, x_T, generator)
    if sampler == "ddpm":
        return ddpm_sample(unet, schedule, y, shape, guidance_scale, x_T=x_T, generator=generator)
    raise ValueError(f"sampling: unknown sampler {sampler!r} ({' | '.join(SAMPLERS)})")
