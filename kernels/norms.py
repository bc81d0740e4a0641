"""Per-example gradients of LayerNorm / GroupNorm affine parameters.

xhat (B, N, C): the normalised input before the affine map (LayerNorm: N = tokens; GroupNorm:
the caller passes (B, H*W, C), a permuted view is fine); G (B, N, C): gradient of the layer
output. Per example:
    dL/dweight_i = sum_n G_inc * xhat_inc  (B, C)      dL/dbias_i = sum_n G_inc  (B, C)
These are small (B*C), so norms and clipped sums are taken from them directly:
`norm_affine_sqnorm_torch` and `norm_affine_clipped_sum_torch` below.

This module holds the plain-PyTorch reference; the C++ op is csrc/linear_ops.cpp
(`norm_affine_grads`), the Triton kernel kernels/norms_triton.py. fp16/bf16 inputs give fp32
results (fp32 accumulation) on every backend.
"""
from __future__ import annotations

import torch


def check_norm_inputs(xhat: torch.Tensor, G: torch.Tensor) -> None:
    if xhat.shape != G.shape or xhat.dim() != 3:
        raise ValueError(f"expected xhat and G of equal shape (B,N,C); got {tuple(xhat.shape)}, {tuple(G.shape)}")
    if xhat.device != G.device:
        raise ValueError(f"xhat and G must be on one device, got {xhat.device} and {G.device}")
    if not (xhat.is_floating_point() and G.is_floating_point()):
        raise TypeError(f"xhat and G must be floating point, got {xhat.dtype} and {G.dtype}")


def norm_affine_grads_torch(xhat: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_norm_inputs(xhat, G)
    dt = torch.promote_types(xhat.dtype, G.dtype)
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    xhat, G = xhat.to(acc), G.to(acc)
    return (G * xhat).sum(dim=1), G.sum(dim=1)  # (B, C), (B, C)


def norm_affine_sqnorm_torch(gw: torch.Tensor | None, gb: torch.Tensor | None) -> torch.Tensor:
    """(B,) squared norms from the per-example (B, C) affine grads (either may be None)."""
    parts = [t.pow(2).sum(dim=1) for t in (gw, gb) if t is not None]
    if not parts:
        raise ValueError("need at least one of gw, gb")
    return sum(parts)


def norm_affine_clipped_sum_torch(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i g_i for per-example (B, C) affine grads -> (C,)."""
    return coef.to(g.dtype) @ g
