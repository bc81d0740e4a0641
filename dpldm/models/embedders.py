"""Class conditioning: one learned context token per class, plus a null class for CFG."""
from __future__ import annotations

import torch
from torch import nn


class ClassEmbedder(nn.Module):
    """`nn.Embedding(num_classes + 1, context_dim)`; row `num_classes` is the null (unconditional)
    class used for classifier-free guidance. `forward(y)` returns the context (B, 1, context_dim)."""

    def __init__(self, num_classes: int, context_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, context_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # y: (B,) int64 in [0, num_classes]
        if y.ndim != 1:
            raise ValueError(f"ClassEmbedder: labels must be 1-D (B,), got shape {tuple(y.shape)}")
        return self.embedding(y)[:, None, :]  # (B, 1, context_dim)
