"""KL-regularised convolutional autoencoder (the first stage of a latent diffusion model).

`Autoencoder(cfg)` maps images (B, C, H, W) in [-1, 1] to a diagonal Gaussian posterior over
latents (B, latent_channels, H/f, W/f), f = 2 ** (len(channel_mult) - 1) in {1, 2, 4, 8}, and
decodes latents back to images. Layout in the style of the LDM first stage: ResNet blocks
with GroupNorm + SiLU, strided-conv downsampling, nearest-neighbour + conv upsampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpldm.config import AutoencoderConfig


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide `channels` (channel counts are multiples of 8)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C_in, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; `moments` is (B, 2*C, h, w) = [mean, logvar]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # each (B, C, h, w)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example, summed over latent dimensions: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=(1, 2, 3))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = cfg.base_channels
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width))
                ch = width
            if level != len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResnetBlock(ch, ch), ResnetBlock(ch, ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2*Z, H/f, W/f)
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(ch, ch), ResnetBlock(ch, ch))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, widths[level]))
                ch = widths[level]
            if level != 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, Z, h, w) -> (B, C, h*f, w*f)
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x`, `forward(x) -> (recon, posterior)`."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # x: (B, C, H, W) in [-1, 1]
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"Autoencoder.encode: expected (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"Autoencoder.encode: H and W must be divisible by f={f}, got {tuple(x.shape[2:])}")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, Z, h, w) -> (B, C, h*f, w*f)
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"Autoencoder.decode: expected (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, Z, h, w)
        return self.decode(z), posterior
