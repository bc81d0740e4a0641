"""Per-example gradient norms and clipped sums for nn.Embedding (the class embedder).

idx (B, T) integer rows looked up, G (B, T, d) gradients of the looked-up vectors.
Per example the weight gradient is sum_t onehot(idx_t) G_t, so
    ||grad_i||^2 = sum_{t,s} [idx_t == idx_s] <G_t, G_s>     (= ||G_i||^2 when T = 1)
    clipped sum  = index_add over all rows of coef_i * G_it.
"""
from __future__ import annotations

import torch


def embedding_sqnorm_torch(idx: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    if idx.dim() == 1:
        idx, G = idx.unsqueeze(1), G.unsqueeze(1)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)  # (B, T, T)
    gram = torch.bmm(G, G.transpose(1, 2))  # (B, T, T)
    return (same * gram).sum(dim=(1, 2))


def embedding_clipped_sum_torch(idx: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    if idx.dim() == 1:
        idx, G = idx.unsqueeze(1), G.unsqueeze(1)
    B, T, d = G.shape
    rows = (G * coef.to(G.dtype).view(B, 1, 1)).reshape(B * T, d)
    out = G.new_zeros(num_embeddings, d)
    return out.index_add_(0, idx.reshape(-1), rows)
