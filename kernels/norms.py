"""Per-example gradients of LayerNorm / GroupNorm affine parameters.

xhat (B, N, C): the normalised input before the affine map (LayerNorm: N = tokens; GroupNorm:
the caller passes (B, H*W, C)); G (B, N, C): gradient of the layer output. Per example:
    dL/dweight_i = sum_n G_inc * xhat_inc  (B, C)      dL/dbias_i = sum_n G_inc  (B, C)
These are small (B*C), so norms and clipped sums are taken from them directly.
"""
from __future__ import annotations

import torch


def norm_affine_grads_torch(xhat: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if xhat.shape != G.shape or xhat.dim() != 3:
        raise ValueError(f"expected xhat and G of equal shape (B,N,C); got {tuple(xhat.shape)}, {tuple(G.shape)}")
    return (G * xhat).sum(dim=1), G.sum(dim=1)  # (B, C), (B, C)
