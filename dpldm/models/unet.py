"""Class-conditional UNet in the LDM style (epsilon prediction on latents).

Input blocks (per level: `num_res_blocks` x [ResBlock (+ SpatialTransformer)], then a strided
downsample except at the last level), a middle block (ResBlock, SpatialTransformer, ResBlock)
and output blocks (per level, bottom-up: `num_res_blocks + 1` x [ResBlock on the concatenated
skip (+ SpatialTransformer)], then an upsample except at the top level). SpatialTransformers
sit at the levels in `unet.attention_levels` (and in the middle block when
`unet.middle_attention`), and cross-attend to the class context of `ClassEmbedder`.
`attention_modules()` lists them in forward order; the paper numbers them 1..N in that order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpldm.config import UNetConfig
from dpldm.models.attention import SpatialTransformer
from dpldm.models.autoencoder import Upsample, group_norm
from dpldm.models.embedders import ClassEmbedder


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim) (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv (zero-init)."""

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # x: (B, C_in, H, W), emb: (B, E)
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, H, W)
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """Feeds the timestep embedding to ResBlocks and the class context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """`forward(x, t, y) -> eps`: x (B, C, h, w) noisy latents, t (B,) int timesteps, y (B,) int
    labels with `y == num_classes` the null class."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
        self.num_classes = cfg.num_classes
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embedder = ClassEmbedder(cfg.num_classes, cfg.context_dim)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, cfg.dropout)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mc * mult, cfg.dropout)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_ch, ch, cfg.dropout)]
        if cfg.middle_attention:
            middle.append(transformer(ch))
        middle.append(ResBlock(ch, emb_ch, ch, cfg.dropout))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mc * mult, cfg.dropout)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def attention_modules(self) -> list[SpatialTransformer]:
        """The SpatialTransformers in forward order: input blocks, middle block, output blocks.
        Module k (1-based, as in the paper) is `attention_modules()[k - 1]`."""
        return [m for m in self.modules() if isinstance(m, SpatialTransformer)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (B, C, h, w), t: (B,), y: (B,)
        if x.ndim != 4 or t.shape != x.shape[:1] or y.shape != x.shape[:1]:
            raise ValueError(f"UNet: expected x (B, C, h, w), t (B,), y (B,); got {tuple(x.shape)}, "
                             f"{tuple(t.shape)}, {tuple(y.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))  # (B, 4*mc)
        context = self.label_embedder(y)  # (B, 1, context_dim)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)  # (B, C_l, h_l, w_l)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)  # (B, C, h, w)
