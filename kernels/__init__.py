"""dpldm.kernels: per-example gradient norm and clipped-sum ops for the DP engine.

Every op has a plain-PyTorch reference (the `*_torch` functions); `backend` selects an
implementation: "auto" | "torch" | "triton" | "cpp" | "cuda". kernels/registry.py holds the one
table of ops x backends x dtypes/devices and `select()` (the fixed rule for "auto", or a
measurement by kernels/selection.py's KernelSelector passed as `selector=`); kernels/dispatch.py
says which backend can run where. Installed as `dpldm.kernels`.

Public ops (all return fp32 for fp16/bf16 inputs, the input dtype for fp32/fp64):
  per_example_sqnorm_linear(A, G, *, bias=False, mask=None, method="auto", backend="auto") -> (B,)
  clipped_sum_linear(A, G, coef, *, bias=False, mask=None, backend="auto") -> (W (d_out,d_in), b (d_out,) | None)
  norm_affine_grads(xhat, G, *, backend="auto") -> (gw (B,C), gb (B,C))
  embedding_sqnorm(idx, G, *, backend="auto") -> (B,)
  embedding_clipped_sum(idx, G, coef, num_embeddings, *, backend="auto") -> (num_embeddings, d)
  select(op, device, dtype, backend=, method=, shape=, selector=) -> (Impl, reason)
  choose_method(T, d_in, d_out, backend="torch"), resolve_backend(backend, device=None),
  available_backends(device=None), backend_report()
The linear and norm ops also take selector= (a KernelSelector) and impl= (an Impl already chosen).
Secure noise: dpldm.kernels.secure_noise.SecureGaussian.
"""
from __future__ import annotations

import torch

from .dispatch import BACKENDS, BackendUnavailableError, available_backends, backend_report
from .embedding import embedding_clipped_sum_torch, embedding_sqnorm_torch, normalize_embedding_inputs
from .linear import (clipped_sum_linear_torch, normalize_inputs, per_example_sqnorm_linear_loop,
                     per_example_sqnorm_linear_torch)
from .norms import (check_norm_inputs, norm_affine_clipped_sum_torch, norm_affine_grads_torch,
                    norm_affine_sqnorm_torch)
from .registry import (METHODS, OPS, REGISTRY, BackendDtypeError, Impl, LinearShape, NormShape, choose_method,
                       resolve_backend, select)


def _impl(op: str, impl: Impl | None, device, dtype, backend: str, method: str, shape, selector) -> Impl:
    if impl is not None:
        if impl.op != op:
            raise ValueError(f"impl {impl.name} implements {impl.op}, not {op}")
        return impl
    return select(op, device, dtype, backend=backend, method=method, shape=shape, selector=selector)[0]


def per_example_sqnorm_linear(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False,
                              mask: torch.Tensor | None = None, method: str = "auto",
                              backend: str = "auto", selector=None, impl: Impl | None = None) -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example weight gradients G_i^T A_i of a Linear layer
    (+ ||sum_t G_it||^2 when bias). A (B,T,d_in), G (B,T,d_out) (2-D: T = 1), mask (B,T) 0/1 rows.
    method: "ghost" (T x T Gram tiles), "fused" (d_out x d_in tiles, never the per-example stack),
    "materialize" (torch only; same numbers as fused elsewhere), "auto". The implementation comes
    from registry.select (backend, method, selector), or `impl` when the caller already chose."""
    A, G, mask = normalize_inputs(A, G, mask)
    shape = LinearShape(A.shape[1], A.shape[2], G.shape[2], bool(bias))
    return _impl("linear_sqnorm", impl, A.device, A.dtype, backend, method, shape, selector).fn(A, G, mask, bool(bias))


def clipped_sum_linear(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, *, bias: bool = False,
                       mask: torch.Tensor | None = None, backend: str = "auto", selector=None,
                       impl: Impl | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_i coef_i G_i^T A_i of shape (d_out, d_in), sum_i coef_i sum_t G_it of shape (d_out,) or
    None), with coef (B,) (times the row mask) applied inside the GEMM."""
    A, G, mask = normalize_inputs(A, G, mask)
    if not isinstance(coef, torch.Tensor) or coef.shape != (A.shape[0],):
        raise ValueError(f"coef must be a tensor of shape (B,)=({A.shape[0]},), got {getattr(coef, 'shape', type(coef))}")
    if coef.device != A.device:
        raise ValueError(f"coef must be on {A.device}, got {coef.device}")
    shape = LinearShape(A.shape[1], A.shape[2], G.shape[2], bool(bias))
    fn = _impl("linear_clipped_sum", impl, A.device, A.dtype, backend, "auto", shape, selector).fn
    return fn(A, G, coef, mask, bool(bias))


def norm_affine_grads(xhat: torch.Tensor, G: torch.Tensor, *, backend: str = "auto", selector=None,
                      impl: Impl | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example LayerNorm/GroupNorm affine grads: ((B,C) sum_n G*xhat, (B,C) sum_n G);
    xhat, G (B,N,C), any strides. Norms / clipped sums: norm_affine_sqnorm_torch,
    norm_affine_clipped_sum_torch (B*C work, no kernel needed)."""
    check_norm_inputs(xhat, G)
    if xhat.dtype != G.dtype:
        dt = torch.promote_types(xhat.dtype, G.dtype)
        xhat, G = xhat.to(dt), G.to(dt)
    shape = NormShape(xhat.shape[1], xhat.shape[2])
    return _impl("norm_affine_grads", impl, xhat.device, xhat.dtype, backend, "auto", shape, selector).fn(xhat, G)


def embedding_sqnorm(idx: torch.Tensor, G: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """(B,) per-example squared norms of an Embedding's weight gradient; idx (B,T), G (B,T,d)."""
    idx, G = normalize_embedding_inputs(idx, G)
    return select("embedding_sqnorm", G.device, G.dtype, backend=backend)[0].fn(idx, G)


def embedding_clipped_sum(idx: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, num_embeddings: int, *,
                          backend: str = "auto") -> torch.Tensor:
    """sum_i coef_i grad_i of an Embedding: (num_embeddings, d). A scatter-add: the torch code
    is every backend's registered implementation (the backend is still checked)."""
    idx, G = normalize_embedding_inputs(idx, G)
    return select("embedding_clipped_sum", G.device, G.dtype, backend=backend)[0].fn(idx, G, coef, num_embeddings)


__all__ = [
    "BACKENDS", "METHODS", "OPS", "REGISTRY", "Impl", "LinearShape", "NormShape", "select",
    "BackendUnavailableError", "BackendDtypeError", "resolve_backend", "available_backends", "backend_report",
    "choose_method",
    "per_example_sqnorm_linear", "clipped_sum_linear", "norm_affine_grads",
    "embedding_sqnorm", "embedding_clipped_sum",
    "per_example_sqnorm_linear_torch", "clipped_sum_linear_torch", "per_example_sqnorm_linear_loop",
    "norm_affine_grads_torch", "norm_affine_sqnorm_torch", "norm_affine_clipped_sum_torch",
    "embedding_sqnorm_torch", "embedding_clipped_sum_torch",
]
