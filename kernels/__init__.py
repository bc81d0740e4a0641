"""dpldm.kernels: per-example gradient norm and clipped-sum ops for the DP engine.

Every op has a plain-PyTorch reference (the `*_torch` functions); `backend` selects an
implementation: "auto" | "torch" | "triton" | "cpp" | "cuda". Installed as `dpldm.kernels`.
"""
from __future__ import annotations

import torch

from .embedding import embedding_clipped_sum_torch, embedding_sqnorm_torch
from .linear import choose_method, clipped_sum_linear_torch, per_example_sqnorm_linear_torch
from .norms import norm_affine_grads_torch

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "torch" if backend == "auto" else backend


def per_example_sqnorm_linear(A, G, *, bias=False, mask=None, method="auto", backend="auto"):
    b = resolve_backend(backend, A.device)
    if b != "torch":
        raise NotImplementedError(f"backend {b!r} is not available")
    return per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method=method)


def clipped_sum_linear(A, G, coef, *, bias=False, mask=None, backend="auto"):
    b = resolve_backend(backend, A.device)
    if b != "torch":
        raise NotImplementedError(f"backend {b!r} is not available")
    return clipped_sum_linear_torch(A, G, coef, bias=bias, mask=mask)


def norm_affine_grads(xhat, G, *, backend="auto"):
    resolve_backend(backend, xhat.device)
    return norm_affine_grads_torch(xhat, G)


def embedding_sqnorm(idx, G, *, backend="auto"):
    resolve_backend(backend, G.device)
    return embedding_sqnorm_torch(idx, G)


def embedding_clipped_sum(idx, G, coef, num_embeddings, *, backend="auto"):
    resolve_backend(backend, G.device)
    return embedding_clipped_sum_torch(idx, G, coef, num_embeddings)


__all__ = [
    "BACKENDS", "resolve_backend", "choose_method",
    "per_example_sqnorm_linear", "clipped_sum_linear", "norm_affine_grads",
    "embedding_sqnorm", "embedding_clipped_sum",
    "per_example_sqnorm_linear_torch", "clipped_sum_linear_torch", "norm_affine_grads_torch",
    "embedding_sqnorm_torch", "embedding_clipped_sum_torch",
]
