"""Triton kernel for the per-example Embedding gradient norm of kernels/embedding.py
(reference: `embedding_sqnorm_torch` there; tests/test_kernels_triton.py compares them).

idx (B, T) rows looked up, G (B, T, d). ||grad_i||^2 = sum_{t,s} [idx_t == idx_s] <G_t, G_s>:
the ghost kernel of kernels/linear_triton.py with the A Gram replaced by index equality. Grid
(B, tile pairs s <= r of the T x T matrix); never holds B*T*T. The clipped sum is a scatter-add
with no GEMM to fuse and stays the torch `index_add_` for every backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_triton import INTERPRET, _check


@triton.jit
def _emb_sqnorm_kernel(IDX, G, PAIRS, OUT, T, D, sib, sit, sgb, sgt, sgd, n_pairs,
                       UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    sblk = tl.load(PAIRS + 2 * pid_p)
    rblk = tl.load(PAIRS + 2 * pid_p + 1)
    offs_s = sblk * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_r = rblk * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = offs_s < T
    rm = offs_r < T
    g_base = G + pid_b.to(tl.int64) * sgb
    gg = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < D
        g_s = tl.load(g_base + offs_s[:, None] * sgt + offs_d[None, :] * sgd, mask=sm[:, None] & dm[None, :], other=0.0)
        g_r = tl.load(g_base + offs_r[:, None] * sgt + offs_d[None, :] * sgd, mask=rm[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            gg = tl.dot(g_s.to(tl.float32), tl.trans(g_r.to(tl.float32)), gg, input_precision="ieee")
        else:
            gg = tl.dot(g_s, tl.trans(g_r), gg)
    i_s = tl.load(IDX + pid_b * sib + offs_s * sit, mask=sm, other=-1)
    i_r = tl.load(IDX + pid_b * sib + offs_r * sit, mask=rm, other=-2)
    same = (i_s[:, None] == i_r[None, :]) & sm[:, None] & rm[None, :]
    w = tl.where(sblk == rblk, 1.0, 2.0)
    tl.store(OUT + pid_b * n_pairs + pid_p, w * tl.sum(tl.where(same, gg, 0.0)))


def embedding_sqnorm(idx: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 per-example squared norms; idx (B,T) integer, G (B,T,d)."""
    _check(G)
    B, T, d = G.shape
    if B == 0:
        return torch.zeros(0, dtype=torch.float32, device=G.device)
    BS = max(16, min(64, triton.next_power_of_2(max(T, 1))))
    BD = max(16, min(64, triton.next_power_of_2(max(d, 1))))
    nt = triton.cdiv(T, BS)
    pairs = torch.tensor([(s, r) for r in range(nt) for s in range(r + 1)], dtype=torch.int32, device=G.device)
    part = torch.empty(B, pairs.shape[0], dtype=torch.float32, device=G.device)
    idx = idx.to(torch.int64)
    _emb_sqnorm_kernel[(B, pairs.shape[0])](idx, G, pairs, part, T, d, *idx.stride(), *G.stride(), pairs.shape[0],
                                            UPCAST=INTERPRET or G.dtype == torch.float32, BLOCK_S=BS, BLOCK_D=BD)
    return part.sum(dim=1)
