"""Random affine jitter of image batches (rotation, scale, shift), shared by the downstream CNN's
training augmentation and the public proxy (stand-in copies, judge batches).

Written here because torchvision is not a dependency; `F.affine_grid` + `F.grid_sample` do the
work. Images are (N, C, H, W) in [-1, 1] with background -1 (what moves in from outside the
canvas is background).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, offset_px: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): output pixel p of image i reads the input at
    R(angle[i]) p / scale[i] + offset_px[i] (coordinates about the centre, in pixels; x right, y down).
    At angle = pi/2 (scale 1, no offset) that is torch.rot90(x, 1, (2, 3)); the content grows by scale and, at angle 0,
    moves by -offset_px * scale. Reads outside the canvas give background (-1)."""
    n, _, h, w = x.shape
    t = offset_px * 2 / torch.tensor([w, h], dtype=offset_px.dtype)  # (N, 2) in the grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # (N,)
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def random_affine(x: torch.Tensor, g: torch.Generator, max_rotation_deg: float, max_scale: float,
                  max_shift_px: float) -> torch.Tensor:
    """`affine` with each image rotated by U(-r, r) degrees, scaled by U(1-s, 1+s) and offset by
    U(-p, p) pixels per axis; three draws from `g` per image, in this order (the proxy's stand-in
    copies depend on these bytes: keep the order)."""
    n, _, h, w = x.shape
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_rotation_deg)  # (N,)
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * max_scale  # (N,)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_px  # (N, 2) pixels
    return affine(x, ang, s, t)
