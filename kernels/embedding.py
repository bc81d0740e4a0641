"""Per-example gradient norms and clipped sums for nn.Embedding (the class embedder).

idx (B, T) integer rows looked up, G (B, T, d) gradients of the looked-up vectors (1-D idx and
(B, d) G mean T = 1). Per example the weight gradient is sum_t onehot(idx_t) G_t, so
    ||grad_i||^2 = sum_{t,s} [idx_t == idx_s] <G_t, G_s>     (= ||G_i||^2 when T = 1)
    clipped sum  = index_add over all rows of coef_i * G_it.
This module holds the plain-PyTorch reference; the Triton norm kernel is
kernels/embedding_triton.py. The clipped sum is the torch scatter-add on every backend.
fp16/bf16 inputs give fp32 results.
"""
from __future__ import annotations

import torch


def normalize_embedding_inputs(idx: torch.Tensor, G: torch.Tensor):
    if idx.dim() == 1 and G.dim() == 2:
        idx, G = idx.unsqueeze(1), G.unsqueeze(1)
    if idx.dim() != 2 or G.dim() != 3 or tuple(idx.shape) != tuple(G.shape[:2]):
        raise ValueError(f"expected idx (B,T) and G (B,T,d); got {tuple(idx.shape)} and {tuple(G.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    if idx.device != G.device:
        raise ValueError(f"idx and G must be on one device, got {idx.device} and {G.device}")
    return idx, G


def _acc(G: torch.Tensor) -> torch.Tensor:
    return G.float() if G.dtype in (torch.float16, torch.bfloat16) else G


def embedding_sqnorm_torch(idx: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    idx, G = normalize_embedding_inputs(idx, G)
    G = _acc(G)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)  # (B, T, T)
    gram = torch.bmm(G, G.transpose(1, 2))  # (B, T, T)
    return (same * gram).sum(dim=(1, 2))


def embedding_clipped_sum_torch(idx: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    idx, G = normalize_embedding_inputs(idx, G)
    G = _acc(G)
    B, T, d = G.shape
    if coef.shape != (B,):
        raise ValueError(f"coef must have shape (B,)=({B},), got {tuple(coef.shape)}")
    if B and (int(idx.min()) < 0 or int(idx.max()) >= num_embeddings):
        raise IndexError(f"idx must lie in [0, {num_embeddings}), got [{int(idx.min())}, {int(idx.max())}]")
    rows = (G * coef.to(G.dtype).view(B, 1, 1)).reshape(B * T, d)
    out = G.new_zeros(num_embeddings, d)
    return out.index_add_(0, idx.reshape(-1), rows)
