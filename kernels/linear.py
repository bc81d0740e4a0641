"""Per-example gradient norms and clipped sums for Linear layers (the attention projections).

Shapes: A (B, T, d_in) layer inputs, G (B, T, d_out) gradients of the layer outputs, optional
mask (B, T) of 0/1 rows. A Linear on vectors is the case T = 1. The per-example weight gradient
is G_i^T A_i (d_out, d_in); it is never stored for the whole batch by the ghost path.

    ghost:       ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>       cost B*T^2*(d_in + d_out)
    materialize: sum((G_i^T A_i)^2)                                cost B*T*d_in*d_out, memory B*d_in*d_out
    clipped sum: sum_i c_i G_i^T A_i = (c * G)^T A over B*T rows    one GEMM

This module holds the plain-PyTorch reference; faster backends register in `kernels.dispatch`.
"""
from __future__ import annotations

import torch

GHOST_BLOCK = 256  # rows of the T x T Gram tiles in the ghost reference (bounds its memory)


def _as_sequence(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None):
    if A.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)  # (B, d) -> (B, 1, d)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(1)
    if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(f"expected A (B,T,d_in) and G (B,T,d_out) with equal B,T; got {tuple(A.shape)} and {tuple(G.shape)}")
    if mask is not None:
        if mask.shape != A.shape[:2]:
            raise ValueError(f"mask must have shape (B,T)={tuple(A.shape[:2])}, got {tuple(mask.shape)}")
        G = G * mask.to(G.dtype).unsqueeze(-1)  # masked rows contribute nothing
    return A, G


def choose_method(T: int, d_in: int, d_out: int) -> str:
    """Ghost when its T^2 Gram work is smaller than materialising d_in*d_out (design rule)."""
    return "ghost" if 2 * T * T < d_in * d_out else "materialize"


def per_example_sqnorm_linear_torch(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False,
                                    mask: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example gradients of a Linear layer (+ bias)."""
    A, G = _as_sequence(A, G, mask)
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    acc = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    A, G = A.to(acc), G.to(acc)
    if method == "auto":
        method = choose_method(T, d_in, d_out)
    if method == "ghost":
        out = A.new_zeros(B)
        for s in range(0, T, GHOST_BLOCK):  # tiles of rows of the T x T Gram matrices
            a_gram = torch.bmm(A[:, s:s + GHOST_BLOCK], A.transpose(1, 2))  # (B, tile, T)
            g_gram = torch.bmm(G[:, s:s + GHOST_BLOCK], G.transpose(1, 2))  # (B, tile, T)
            out += (a_gram * g_gram).sum(dim=(1, 2))
    elif method in ("materialize", "fused"):
        per_example = torch.bmm(G.transpose(1, 2), A)  # (B, d_out, d_in)
        out = per_example.pow(2).sum(dim=(1, 2))
    else:
        raise ValueError(f"method must be auto|ghost|materialize|fused, got {method!r}")
    if bias:
        out = out + G.sum(dim=1).pow(2).sum(dim=1)  # (B, d_out) bias gradients
    return out


def clipped_sum_linear_torch(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, *, bias: bool = False,
                             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i coef_i G_i^T A_i as (d_out, d_in), and sum_i coef_i sum_t G_it as (d_out,) if bias."""
    A, G = _as_sequence(A, G, mask)
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    if coef.shape != (B,):
        raise ValueError(f"coef must have shape (B,)={B}, got {tuple(coef.shape)}")
    Gc = G * coef.to(G.dtype).view(B, 1, 1)  # (B, T, d_out)
    weight = Gc.reshape(B * T, d_out).t() @ A.reshape(B * T, d_in)  # (d_out, d_in)
    bias_sum = Gc.sum(dim=(0, 1)) if bias else None
    return weight, bias_sum
