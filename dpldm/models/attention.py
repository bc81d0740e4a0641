"""SpatialTransformer in the LDM style, written so the DP engine can see every trainable layer.

Trainable layer types here are only nn.Linear, nn.LayerNorm and nn.GroupNorm (the DP engine
has per-example gradient rules for exactly these, plus nn.Embedding for the class embedder).
Attention is plain matmul + softmax (no fused SDPA), so activations and output gradients of
q/k/v/out are visible to module hooks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpldm.models.autoencoder import group_norm


class CrossAttention(nn.Module):
    """Multi-head attention of `x` (B, T, query_dim) over `context` (B, S, context_dim), or over
    itself when context is None. q/k/v Linear without bias, output Linear with bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, h*d) -> (B, h, T, d)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (B, S, C_ctx)
        q = self._split(self.to_q(x))  # (B, h, T, d)
        k = self._split(self.to_k(context))  # (B, h, S, d)
        v = self._split(self.to_v(context))  # (B, h, S, d)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # (B, h, T, S)
        out = torch.matmul(attn, v)  # (B, h, T, d)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, T, h*d)
        return self.to_out(out)  # (B, T, query_dim)


class GEGLU(nn.Module):
    """Linear to 2*dim_out, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim_in) -> (B, T, dim_out)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim)
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x + self-attn(LN(x)); x + cross-attn(LN(x), context); x + GEGLU-FF(LN(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, dim_head)  # self-attention
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # x: (B, T, dim), context: (B, S, C_ctx)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in (Linear) -> transformer blocks -> proj_out (Linear, zero-init) -> + x."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SpatialTransformer: heads={heads} must divide channels={channels}")
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = self.proj_in(tokens)  # (B, T, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, T, C)
        tokens = self.proj_out(tokens)  # (B, T, C)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
