"""Diffusion: schedules, the K-timestep per-example loss, CFG, DDPM/DDIM samplers, EMA."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from dpldm.config import UNetConfig
from dpldm.diffusion.ema import EMA
from dpldm.diffusion.loss import draw_timesteps_and_noise, per_example_loss
from dpldm.diffusion.sampling import combine_guidance, ddim_sample, ddim_timesteps, ddpm_sample, guided_eps
from dpldm.diffusion.schedule import DiffusionSchedule, make_betas
from dpldm.models.unet import UNet


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(randomize_output: bool = True) -> UNet:
    unet = UNet(UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(0, 1), num_heads=2, context_dim=8, num_classes=4))
    if randomize_output:  # zero-initialised output layers would make eps == 0
        with torch.no_grad():
            for m in unet.attention_modules():
                m.proj_out.weight.normal_(0, 0.2)
            unet.out[-1].weight.normal_(0, 0.2)
    return unet.eval()


def test_linear_and_cosine_betas_match_numpy():
    lin = make_betas("linear", 1000, 0.0015, 0.0195)
    assert lin.dtype == torch.float64 and lin.shape == (1000,)
    np.testing.assert_allclose(lin.numpy(), np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2, rtol=1e-12)
    cos = make_betas("cosine", 100)
    f = np.cos((np.arange(101) / 100 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cos.numpy(), np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    s = DiffusionSchedule(lin)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - lin.numpy()), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)


def test_q_sample():
    s = DiffusionSchedule(make_betas("linear", 50))
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 17, 49])
    abar = np.cumprod(1 - s.betas.numpy())[t.numpy()]
    ref = np.sqrt(abar)[:, None, None, None] * x0.numpy() + np.sqrt(1 - abar)[:, None, None, None] * noise.numpy()
    np.testing.assert_allclose(s.q_sample(x0, t, noise).numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3])
def test_per_example_loss_matches_explicit_loop(K):
    unet, s = tiny_unet(), DiffusionSchedule(make_betas("linear", 100))
    B = 4
    z0, y = torch.randn(B, 2, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = per_example_loss(unet, z0, y, s, K, generator=torch.Generator().manual_seed(5))
    assert loss.shape == (B,)
    t, noise = draw_timesteps_and_noise(z0.shape, K, 100, torch.Generator().manual_seed(5))
    ref = torch.zeros(B)
    with torch.no_grad():
        for i in range(B):
            for k in range(K):
                r = i * K + k  # copies of example i are contiguous rows
                a = math.sqrt(s.alphas_cumprod[t[r]].item())
                x_t = a * z0[i:i + 1] + math.sqrt(1 - a * a) * noise[r:r + 1]
                eps = unet(x_t, t[r:r + 1], y[i:i + 1])
                ref[i] += ((eps - noise[r:r + 1]) ** 2).mean() / K
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.mean().detach(), ref.mean(), rtol=1e-4, atol=1e-6)


class Recorder(nn.Module):
    null_class = 9

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append((x.clone(), t.clone(), y.clone()))
        return torch.zeros_like(x)


def test_loss_row_layout_and_condition_dropout():
    s, rec = DiffusionSchedule(make_betas("linear", 10)), Recorder()
    z0 = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    per_example_loss(rec, z0, torch.tensor([4, 5, 6]), s, K=2, generator=torch.Generator().manual_seed(0))
    _, _, y = rec.seen[-1]
    assert y.tolist() == [4, 4, 5, 5, 6, 6]
    t = torch.zeros(6, dtype=torch.long)
    per_example_loss(rec, z0, torch.tensor([4, 5, 6]), s, K=2, t=t, noise=torch.zeros(6, 1, 2, 2))
    x, _, _ = rec.seen[-1]
    a = math.sqrt(s.alphas_cumprod[0].item())
    torch.testing.assert_close(x[:, 0, 0, 0], a * torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))
    per_example_loss(rec, z0, torch.tensor([4, 5, 6]), s, K=2, cond_drop_prob=0.99999,
                     generator=torch.Generator().manual_seed(0))
    assert rec.seen[-1][2].tolist() == [9] * 6


def test_classifier_free_guidance():
    unet = tiny_unet()
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([5, 50, 99]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        cond = unet(x, t, y)
        uncond = unet(x, t, torch.full_like(y, 4))
        torch.testing.assert_close(guided_eps(unet, x, t, y, 1.0), cond, rtol=0, atol=0)
        torch.testing.assert_close(guided_eps(unet, x, t, y, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided_eps(unet, x, t, y, 0.0), uncond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combine_guidance(uncond, cond, 1.0), cond)


def test_ddim_eta1_all_steps_equals_ddpm_ancestral():
    unet, T = tiny_unet(), 20
    s = DiffusionSchedule(make_betas("linear", T, 0.01, 0.2))
    shape = (3, 2, 8, 8)
    y = torch.tensor([0, 1, 3])
    x_T, noise = torch.randn(shape), torch.randn(T, *shape)
    a = ddpm_sample(unet, s, y, shape, guidance_scale=2.0, x_T=x_T, noise=noise)
    b = ddim_sample(unet, s, y, shape, steps=T, eta=1.0, guidance_scale=2.0, x_T=x_T, noise=noise)
    assert a.abs().max() > 0.1  # a real trajectory, not zeros
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = ddim_sample(unet, s, y, shape, steps=T, eta=0.0, x_T=x_T, noise=noise)
    assert (a - c).abs().max() > 1e-2  # eta matters


class Oracle(nn.Module):
    """Exact eps for data that is a single point z*: eps = (x - sqrt(abar) z*) / sqrt(1 - abar)."""
    null_class = 0

    def __init__(self, schedule, target):
        super().__init__()
        self.abar, self.target = schedule.alphas_cumprod, target

    def forward(self, x, t, y):
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", ["ddim0", "ddim1", "ddpm"])
def test_samplers_recover_a_point_mass_with_the_exact_score(sampler):
    s = DiffusionSchedule(make_betas("cosine", 100))
    target = torch.randn(1, 2, 4, 4)
    oracle, y, g = Oracle(s, target), torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        out = ddpm_sample(oracle, s, y, (2, 2, 4, 4), generator=g)
    else:
        out = ddim_sample(oracle, s, y, (2, 2, 4, 4), steps=10, eta=float(sampler[-1]), generator=g)
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), rtol=1e-3, atol=1e-3)


def test_ddim_timesteps():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(20, 20) == list(range(19, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def test_ema_matches_manual_average():
    """Against a float64 loop of LitEma's rule: copy, then d_n = min(decay, (1+n)/(10+n))."""
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    ref = None
    for step in range(40):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        w = model.weight.detach().double().clone()
        d = min(0.9, (1 + step) / (10 + step))
        ref = w if ref is None else d * ref + (1 - d) * w
    torch.testing.assert_close(ema.module.weight.double(), ref, rtol=1e-5, atol=1e-6)
    assert ema.num_updates == 40
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9


def test_ema_forgets_its_first_weights():
    """The v2 failure: a 0.9995 EMA after 4000 steps must hold (almost) none of step 1's weights."""
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.9995)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # the copy: the first weights
    with torch.no_grad():
        model.weight.zero_()
    for _ in range(4000):
        ema.update(model)
    share_of_first = ema.module.weight.item()
    closed_form = math.prod(min(0.9995, (1 + n) / (10 + n)) for n in range(1, 4001))  # 10!/((N+2)...(N+10))
    assert share_of_first == pytest.approx(closed_form, rel=1e-3, abs=1e-30) and share_of_first < 1e-20
    assert 0.9995 ** 4000 > 0.13  # what the EMA without warm-up kept (the v2 failure)
    ema.restart()
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert ema.module.weight.item() == 3.0 and ema.num_updates == 1


def test_ema_state_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    for _ in range(4):
        ema.update(model)
    other = EMA(nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight) and other.num_updates == 4
