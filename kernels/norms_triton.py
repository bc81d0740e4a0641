"""Triton kernel for the LayerNorm / GroupNorm affine per-example gradients of kernels/norms.py
(reference: `norm_affine_grads_torch` there; tests/test_kernels_triton.py compares them).

xhat, G (B, N, C) with any strides (a GroupNorm caller may pass (B,C,HW) permuted to (B,HW,C)
without a copy). Grid (B, C tiles); each program reduces its (N, BLOCK_C) column strip in fp32:
    gw[i, c] = sum_n G[i,n,c] * xhat[i,n,c]      gb[i, c] = sum_n G[i,n,c]
Elementwise work, so every dtype is cast to fp32 right after tl.load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_triton import _check


@triton.jit
def _norm_affine_kernel(X, G, GW, GB, N, C, sxb, sxn, sxc, sgb, sgn, sgc,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
    cm = offs_c < C
    accw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    accb = tl.zeros((BLOCK_C,), dtype=tl.float32)
    xb = X + pid_b.to(tl.int64) * sxb
    gb = G + pid_b.to(tl.int64) * sgb
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        msk = (offs_n[:, None] < N) & cm[None, :]
        x = tl.load(xb + offs_n[:, None] * sxn + offs_c[None, :] * sxc, mask=msk, other=0.0).to(tl.float32)
        g = tl.load(gb + offs_n[:, None] * sgn + offs_c[None, :] * sgc, mask=msk, other=0.0).to(tl.float32)
        accw += tl.sum(x * g, axis=0)
        accb += tl.sum(g, axis=0)
    tl.store(GW + pid_b * C + offs_c, accw, mask=cm)
    tl.store(GB + pid_b * C + offs_c, accb, mask=cm)


def norm_affine_grads(xhat: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,C) weight grads, (B,C) bias grads), fp32."""
    _check(xhat)
    B, N, C = xhat.shape
    gw = torch.empty(B, C, dtype=torch.float32, device=xhat.device)
    gb = torch.empty(B, C, dtype=torch.float32, device=xhat.device)
    if B == 0 or C == 0:
        return gw, gb
    BC = max(16, min(128, triton.next_power_of_2(C)))
    BN = max(16, min(64, triton.next_power_of_2(max(N, 1))))
    _norm_affine_kernel[(B, triton.cdiv(C, BC))](xhat, G, gw, gb, N, C, *xhat.stride(), *G.stride(),
                                                 BLOCK_N=BN, BLOCK_C=BC)
    return gw, gb
