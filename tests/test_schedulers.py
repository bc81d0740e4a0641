"""diffusers' schedulers driving our UNet (dpldm.diffusion.schedulers) against independent references:
our own float64 DDIM on the same timesteps, the exact score of a point mass, and the closed-form
probability-flow map of Gaussian data."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpldm.config import ConfigError, load_config
from dpldm.diffusion.sampling import ddim_sample
from dpldm.diffusion.schedule import DiffusionSchedule, make_betas
from dpldm.diffusion.schedulers import SCHEDULERS, make_scheduler, sample, scheduler_sample
from test_diffusion import Oracle, tiny_unet


def leading(T: int, steps: int) -> list[int]:
    return [(steps - 1 - i) * (T // steps) for i in range(steps)]


@pytest.mark.parametrize("T,steps", [(1000, 10), (1000, 50), (100, 3), (100, 7)])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_diffusers_ddim_equals_our_ddim_on_the_same_timesteps(T, steps, guidance):
    torch.manual_seed(0)
    unet, s = tiny_unet(), DiffusionSchedule(make_betas("linear", T))
    shape, y = (3, 2, 8, 8), torch.tensor([0, 1, 3])
    x_T = torch.randn(shape)
    assert make_scheduler("ddim", s, steps).timesteps.tolist() == leading(T, steps)
    ours = ddim_sample(unet, s, y, shape, steps=steps, guidance_scale=guidance, x_T=x_T, timesteps=leading(T, steps))
    theirs = scheduler_sample(unet, s, y, shape, "ddim", steps=steps, guidance_scale=guidance, x_T=x_T)
    assert ours.abs().max() > 1  # a real trajectory
    # float32 tables in diffusers vs float64 here: relative error of a few 1e-6
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))


def test_ddim_eta_draws_from_the_generator():
    unet, s = tiny_unet(), DiffusionSchedule(make_betas("linear", 100))
    shape, y, x_T = (2, 2, 8, 8), torch.tensor([0, 1]), torch.randn(2, 2, 8, 8)

    def run(eta, seed):
        return scheduler_sample(unet, s, y, shape, "ddim", steps=5, eta=eta, x_T=x_T,
                                generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(1.0, 3), run(1.0, 3), rtol=0, atol=0)
    assert (run(1.0, 3) - run(1.0, 4)).abs().max() > 1e-3
    assert (run(1.0, 3) - run(0.0, 3)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eta"):
        scheduler_sample(unet, s, y, shape, "unipc", steps=5, eta=0.5, x_T=x_T)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_recovers_a_point_mass_with_the_exact_score(name):
    s = DiffusionSchedule(make_betas("linear", 1000))
    target = torch.randn(1, 2, 4, 4)
    out = sample(Oracle(s, target), s, torch.zeros(2, dtype=torch.long), (2, 2, 4, 4), name, steps=5,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), rtol=1e-3, atol=1e-3)


class GaussianScore(nn.Module):
    """Exact eps for data N(mu, sd^2 I): eps = sqrt(1-a) (x - sqrt(a) mu) / (a sd^2 + 1 - a)."""
    null_class = 0

    def __init__(self, schedule, mu, sd):
        super().__init__()
        self.abar, self.mu, self.sd = schedule.alphas_cumprod, mu, sd

    def forward(self, x, t, y):
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.sd ** 2 + 1 - a)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_approaches_the_closed_form_flow_of_gaussian_data(name):
    """The probability-flow ODE maps x_T = sqrt(a_T) mu + sqrt(a_T sd^2 + 1 - a_T) z to mu + sd z."""
    s = DiffusionSchedule(make_betas("linear", 1000))
    torch.manual_seed(1)
    mu, sd = torch.randn(1, 2, 4, 4), 0.3
    x_T, y = torch.randn(4, 2, 4, 4), torch.zeros(4, dtype=torch.long)
    a_T = s.alphas_cumprod[-1].item()
    want = mu + sd * (x_T - a_T ** 0.5 * mu) / (a_T * sd ** 2 + 1 - a_T) ** 0.5
    errors = [(sample(GaussianScore(s, mu, sd), s, y, tuple(x_T.shape), name, steps=n, x_T=x_T) - want).abs().max().item()
              for n in (5, 20, 50, 250)]
    assert errors == sorted(errors, reverse=True), errors  # converges as steps grow
    assert errors[2] < 0.15 and errors[3] < 0.05, errors  # measured: 0.11-0.12 at 50, 0.024-0.030 at 250
    assert errors[0] > 3 * errors[3]  # and the step count matters (not a trivial map)


def test_sampler_settings_are_validated():
    assert load_config(None, ['diffusion.sampler="dpmpp-2m"']).diffusion.sampler == "dpmpp-2m"
    with pytest.raises(ConfigError, match="diffusion.sampler"):
        load_config(None, ['diffusion.sampler="euler"'])
    with pytest.raises(ConfigError, match="diffusion.eta"):
        load_config(None, ['diffusion.sampler="unipc"', "diffusion.eta=0.5"])
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("unipc", DiffusionSchedule(make_betas("linear", 10)), 11)
