"""Tiny LDM folders for the sampling, export, API and bad-input tests (imported as `tiny_ldm`;
pytest puts tests/ on sys.path).

`TINY`: 16x16 one-channel images, f = 2, 2 latent channels, UNet width 16 (the bad-input table's
model). `EXPORTABLE`: every GroupNorm of the UNet and of the autoencoder has 32 groups (all widths
are multiples of 32), two levels with attention at level 1 only, two res blocks and two
transformer blocks per level: what diffusers' UNet2DConditionModel / AutoencoderKL can express.
All weights are perturbed so that zero-initialised output layers do not hide a wrong mapping."""
from __future__ import annotations

from pathlib import Path

import torch

from dpldm.config import load_config
from dpldm.models.ldm import LatentDiffusion, save_ldm

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
    "diffusion.timesteps=20", "diffusion.sample_steps=4",
]
EXPORTABLE = [
    "autoencoder.base_channels=32", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=3",
    "autoencoder.num_res_blocks=1", "unet.in_channels=3", "unet.model_channels=32", "unet.channel_mult=[1, 2]",
    "unet.attention_levels=[1]", "unet.num_res_blocks=2", "unet.transformer_depth=2", "unet.num_heads=2",
    "unet.context_dim=24", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
    "diffusion.timesteps=20", "diffusion.sample_steps=4",
]


@torch.no_grad()
def make_ldm(overrides=TINY, seed: int = 0, scale_factor: float = 0.7, perturb: float = 0.05) -> LatentDiffusion:
    torch.manual_seed(seed)
    ldm = LatentDiffusion(load_config(None, list(overrides)), scale_factor=scale_factor)
    g = torch.Generator().manual_seed(seed + 1000)
    for p in list(ldm.ae.parameters()) + list(ldm.unet.parameters()):
        p.add_(perturb * torch.randn(p.shape, generator=g))
    ldm.ema.averaged.module.load_state_dict(ldm.unet.state_dict())  # EMA = the perturbed weights
    return ldm.eval()


def save_tiny(folder: Path, overrides=TINY, seed: int = 0, extra: dict | None = None) -> Path:
    return save_ldm(folder, make_ldm(overrides, seed), extra)
