"""Tiny model/data shared by the multi-rank scripts and the single-process references in
tests/test_distributed*.py (imported by both, so both build exactly the same thing)."""
from __future__ import annotations

import torch

TINY = [
    "unet.model_channels=16", "unet.channel_mult=[1,2]", "unet.attention_levels=[1]",
    "unet.middle_attention=false", "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=10",
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1,2,4]", "data.image_size=16",
    "diffusion.timesteps=100", "diffusion.cond_drop_prob=0.0",
    "privacy.backend=torch", "train.wandb=false",
]
N = 12  # private examples
EXPECTED = 6  # q*N
SAMPLING_SEED = 7
CLIP = 1.5  # some per-example norms lie above, some below (checked by the test)
PHYSICAL = 2


def cfg(extra: list[str] | None = None):
    from dpldm.config import load_config

    return load_config(None, TINY + [f"privacy.expected_batch_size={EXPECTED}", f"privacy.max_grad_norm={CLIP}",
                                     "privacy.noise_multiplier=1.0", f"privacy.physical_batch_size={PHYSICAL}",
                                     "privacy.delta=1e-3"] + list(extra or []))


def dataset(c):
    from dpldm.data.loaders import InMemoryDataset
    from dpldm.train.private_data import latent_shape

    g = torch.Generator().manual_seed(3)
    x = torch.randn((N, *latent_shape(c)), generator=g)
    y = torch.randint(0, c.data.num_classes, (N,), generator=g)
    return InMemoryDataset(x, y, kind="latents", num_classes=c.data.num_classes)


def init_state(c) -> dict[str, torch.Tensor]:
    from dpldm.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(c.unet)
    with torch.no_grad():  # the UNet zero-inits its output and proj_out layers: perturb so gradients flow
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in unet.state_dict().items()}


def ae_state(c) -> dict[str, torch.Tensor]:
    from dpldm.models.autoencoder import Autoencoder

    torch.manual_seed(1)
    return {k: v.clone() for k, v in Autoencoder(c.autoencoder).state_dict().items()}


class ZeroNoise:
    """'Noise off' for the DPStep (the ledger needs sigma > 0): draws exact zeros, counted."""

    def __init__(self) -> None:
        self.draws = 0

    def draw(self, like, std, step, dtype=None):  # noqa: ARG002
        self.draws += 1
        return [torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in like]

    def state_dict(self) -> dict:
        return {"mode": "zero"}


def reference_update(c, state, step: int = 0, expected: int = EXPECTED) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Independent single-process reference: plain UNet (no DeepSpeed, no DP engine), the global
    Poisson sample of `step`, one autograd gradient per example, clip to C, sum, / (q*N).
    Returns (update by parameter name, per-example gradient norms)."""
    from dpldm.diffusion.loss import per_example_loss
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet
    from dpldm.train.draws import per_example_draws
    from dpldm.privacy.sampler import PoissonPlan

    unet = UNet(c.unet)
    unet.load_state_dict(state)
    apply_finetune(unet, c.train.finetune)
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    sched = DiffusionSchedule.from_config(c.diffusion)
    ds = dataset(c)
    plan = PoissonPlan(N, expected / N, SAMPLING_SEED)
    idx = plan.indices(step)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    norms = []
    for i in idx.tolist():
        x, y = ds.get_batch(torch.tensor([i]))
        t, noise, _ = per_example_draws(torch.tensor([i]), step, c.train.seed, 1, tuple(x.shape[1:]),
                                        sched.num_timesteps, 0.0)
        loss = per_example_loss(unet, x, y, sched, 1, t=t, noise=noise).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        norms.append(norm)
        coef = min(1.0, c.privacy.max_grad_norm / (norm + 1e-6))
        for (n, _), g in zip(params.items(), grads):
            total[n] += coef * g.double()
    return {n: (v / (plan.expected_batch_size)).float() for n, v in total.items()}, norms


def first_step_with(size: int, expected: int, limit: int = 500) -> int:
    """The first step whose global Poisson sample has exactly `size` examples."""
    from dpldm.privacy.sampler import PoissonPlan

    plan = PoissonPlan(N, expected / N, SAMPLING_SEED)
    for s in range(limit):
        if plan.indices(s).numel() == size:
            return s
    raise AssertionError(f"no step with {size} examples in the first {limit}")


def shared_ledger(ctx, privacy_cfg, num_examples: int, seed: int):
    """The trainer's rule: the ledger is made on rank 0 and every rank gets its state."""
    from dpldm.privacy.accountant import PrivacyLedger

    return PrivacyLedger.from_state_dict(
        ctx.on_main(lambda: PrivacyLedger.from_config(privacy_cfg, num_examples, seed=seed).state_dict()))


def loss_fn(c, device):
    """The trainer's per-example loss (scale 1: the tiny latents are used as they are)."""
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.train.dp_loss import DiffusionDPLoss

    return DiffusionDPLoss(DiffusionSchedule.from_config(c.diffusion), scale_factor=1.0,
                           timesteps_per_example=c.diffusion.timesteps_per_example,
                           cond_drop_prob=c.diffusion.cond_drop_prob, seed=c.train.seed, device=device)


def dp_step(module, c, ledger, noise, optimizer, world, device):
    from dpldm.privacy.dp_step import DPStep

    return DPStep(module, loss_fn(c, device), ledger, noise=noise, optimizer=optimizer, world=world, backend="torch",
                  physical_batch_size=PHYSICAL, acc_dtype=torch.float64)
