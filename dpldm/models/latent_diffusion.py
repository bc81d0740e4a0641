"""The `LatentDiffusion` module itself (autoencoder, UNet, schedule, latent scale, EMA) and the
checks every loader applies; saving and loading folders live in dpldm.models.ldm, the diffusers
format in dpldm.interop.diffusers_folder (both import this module, neither the other way round).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dpldm.checkpoint import CheckpointError
from dpldm.config import RunConfig
from dpldm.diffusion.ema import EMA
from dpldm.diffusion.schedulers import sample as sample_latents
from dpldm.diffusion.schedule import DiffusionSchedule
from dpldm.models.autoencoder import Autoencoder
from dpldm.models.unet import UNet


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: RunConfig, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.ae = Autoencoder(cfg.autoencoder)
        self.unet = UNet(cfg.unet)
        self.schedule = DiffusionSchedule.from_config(cfg.diffusion)
        self.scale_factor = float(scale_factor)
        self.ema = EMA(self.unet, cfg.train.ema_decay)  # not a submodule: saved under "ema.*"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.cfg.autoencoder.downsample_factor
        size = self.cfg.data.image_size // f
        return (self.cfg.autoencoder.latent_channels, size, size)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, Z, h, w) (posterior mean unless `sample`)."""
        posterior = self.ae.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, Z, h, w) -> images (B, C, H, W), clamped to [-1, 1]."""
        return self.ae.decode(z / self.scale_factor).clamp(-1, 1)

    def sampling_unet(self, use_ema: bool = True) -> nn.Module:
        return self.ema.module.eval() if use_ema else self.unet

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.double() also move the EMA copy
        super()._apply(fn, recurse)
        self.ema.averaged._apply(fn, recurse)
        return self

    def copy_ema_to_unet(self) -> None:
        """Start from the EMA weights (e.g. before fine-tuning)."""
        self.unet.load_state_dict(self.ema.module.state_dict())

    @torch.no_grad()
    def sample(self, y: torch.Tensor, steps: int | None = None, eta: float | None = None,
               guidance_scale: float | None = None, sampler: str | None = None,
               generator: torch.Generator | None = None, use_ema: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for labels y (B,); unset options come from cfg.diffusion."""
        d = self.cfg.diffusion
        unet = self.sampling_unet(use_ema)
        z = sample_latents(unet, self.schedule, y, (y.shape[0], *self.latent_shape),
                           sampler=sampler or d.sampler, steps=steps or d.sample_steps,
                           eta=d.eta if eta is None else eta,
                           guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
                           generator=generator)  # (B, Z, h, w)
        return self.decode(z)


def check_usable(ldm: "LatentDiffusion", where: str) -> None:
    """Refuse a model that can only produce NaN/black images (sampled, fine-tuned or exported): a
    latent scale factor that is not a finite number > 0, or a NaN/inf tensor anywhere in it."""
    sf = ldm.scale_factor
    if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not math.isfinite(sf) or sf <= 0:
        raise CheckpointError(f"{where}: latent scale_factor must be a finite number > 0, got {sf!r} "
                              "(decoding divides the latents by it)")
    for prefix, module in (("ae", ldm.ae), ("unet", ldm.unet), ("ema", ldm.ema.module)):
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{where}: weight {prefix}.{name} has {bad} NaN/inf value(s); "
                                      "the model cannot produce images")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: '{what}' weights do not match the config in meta.json: {e}") from None
