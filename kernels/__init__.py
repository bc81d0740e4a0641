"""dpldm.kernels: per-example gradient norm and clipped-sum ops for the DP engine.

Every op has a plain-PyTorch reference (the `*_torch` functions); `backend` selects an
implementation: "auto" | "torch" | "triton" | "cpp" | "cuda" (see kernels/dispatch.py for what
"auto" picks and the errors for unavailable ones). Installed as `dpldm.kernels`.

Public ops (all return fp32 for fp16/bf16 inputs, the input dtype for fp32/fp64):
  per_example_sqnorm_linear(A, G, *, bias=False, mask=None, method="auto", backend="auto") -> (B,)
  clipped_sum_linear(A, G, coef, *, bias=False, mask=None, backend="auto") -> (W (d_out,d_in), b (d_out,) | None)
  norm_affine_grads(xhat, G, *, backend="auto") -> (gw (B,C), gb (B,C))
  embedding_sqnorm(idx, G, *, backend="auto") -> (B,)
  embedding_clipped_sum(idx, G, coef, num_embeddings, *, backend="auto") -> (num_embeddings, d)
  choose_method(T, d_in, d_out, backend="torch"), resolve_backend(backend, device=None),
  available_backends(device=None), backend_report()
Secure noise: dpldm.kernels.secure_noise.SecureGaussian.
"""
from __future__ import annotations

import torch

from .dispatch import (BACKENDS, BackendUnavailableError, available_backends, backend_report, cpp_ext, cuda_ext,
                       resolve_backend)
from .embedding import embedding_clipped_sum_torch, embedding_sqnorm_torch, normalize_embedding_inputs
from .linear import (METHODS, choose_method, clipped_sum_linear_ext, clipped_sum_linear_torch, normalize_inputs,
                     per_example_sqnorm_linear_ext, per_example_sqnorm_linear_loop, per_example_sqnorm_linear_torch,
                     resolve_method)
from .norms import (check_norm_inputs, norm_affine_clipped_sum_torch, norm_affine_grads_torch,
                    norm_affine_sqnorm_torch)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pick(backend: str, x: torch.Tensor) -> str:
    """Concrete backend for tensor x; "auto" keeps fp64 (tests, not GPU kernels) on torch/cpp."""
    b = resolve_backend(backend, x.device)
    if b in ("triton", "cuda") and x.dtype not in _TRITON_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(f"backend {b!r} takes fp16, bf16 or fp32 tensors, got {x.dtype}")
    return b


def _cpu_auto_prefers_torch(backend: str, b: str) -> bool:
    """On CPU, "auto" keeps torch (MKL GEMM/bmm) wherever the C++ op only matches its speed.

    Measured on the demo UNet's attention layers (1 thread): a DP step took 0.24 s with torch and
    0.32 s with the C++ ops for every layer (see docs/benchmarks.md). The C++ op earns its place
    where torch would materialise B*d_in*d_out per-example gradients: the fused norm."""
    return backend == "auto" and b == "cpp"


def per_example_sqnorm_linear(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False,
                              mask: torch.Tensor | None = None, method: str = "auto",
                              backend: str = "auto") -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example weight gradients G_i^T A_i of a Linear layer
    (+ ||sum_t G_it||^2 when bias). A (B,T,d_in), G (B,T,d_out) (2-D: T = 1), mask (B,T) 0/1 rows.
    method: "ghost" (T x T Gram tiles), "fused" (d_out x d_in tiles, never the per-example stack),
    "materialize" (torch only; same numbers as fused elsewhere), "auto" (choose_method)."""
    A, G, mask = normalize_inputs(A, G, mask)
    b = _pick(backend, A)
    if _cpu_auto_prefers_torch(backend, b) and resolve_method(method, A.shape[1], A.shape[2], G.shape[-1],
                                                              "torch") == "ghost":
        b = "torch"
    if b == "torch":
        return per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method=method)
    B, T, d_in = A.shape
    m = resolve_method(method, T, d_in, G.shape[-1], b)
    if b == "triton":
        from . import linear_triton as lt
        return (lt.sqnorm_ghost if m == "ghost" else lt.sqnorm_fused)(A, G, mask, bias)
    return per_example_sqnorm_linear_ext(cpp_ext() if b == "cpp" else cuda_ext(), A, G, bias=bias, mask=mask, method=m)


def clipped_sum_linear(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, *, bias: bool = False,
                       mask: torch.Tensor | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_i coef_i G_i^T A_i of shape (d_out, d_in), sum_i coef_i sum_t G_it of shape (d_out,) or
    None), with coef (B,) (times the row mask) applied inside the GEMM."""
    A, G, mask = normalize_inputs(A, G, mask)
    b = _pick(backend, A)
    if _cpu_auto_prefers_torch(backend, b):
        b = "torch"
    if b == "torch":
        return clipped_sum_linear_torch(A, G, coef, bias=bias, mask=mask)
    if not isinstance(coef, torch.Tensor) or coef.shape != (A.shape[0],):
        raise ValueError(f"coef must be a tensor of shape (B,)=({A.shape[0]},), got {getattr(coef, 'shape', type(coef))}")
    if coef.device != A.device:
        raise ValueError(f"coef must be on {A.device}, got {coef.device}")
    if b == "triton":
        from . import linear_triton as lt
        return lt.clipped_sum(A, G, coef, mask, bias)
    return clipped_sum_linear_ext(cpp_ext() if b == "cpp" else cuda_ext(), A, G, coef, bias=bias, mask=mask)


def norm_affine_grads(xhat: torch.Tensor, G: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example LayerNorm/GroupNorm affine grads: ((B,C) sum_n G*xhat, (B,C) sum_n G);
    xhat, G (B,N,C), any strides. Norms / clipped sums: norm_affine_sqnorm_torch,
    norm_affine_clipped_sum_torch (B*C work, no kernel needed)."""
    check_norm_inputs(xhat, G)
    if xhat.dtype != G.dtype:
        dt = torch.promote_types(xhat.dtype, G.dtype)
        xhat, G = xhat.to(dt), G.to(dt)
    b = _pick(backend, xhat)
    if _cpu_auto_prefers_torch(backend, b):
        b = "torch"
    if b == "triton":
        from . import norms_triton
        return norms_triton.norm_affine_grads(xhat, G)
    if b == "cpp":
        gw, gb = cpp_ext().norm_affine_grads(xhat, G)
        return gw, gb
    return norm_affine_grads_torch(xhat, G)  # torch; cuda: no separate .cu op (elementwise, torch is fine)


def embedding_sqnorm(idx: torch.Tensor, G: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """(B,) per-example squared norms of an Embedding's weight gradient; idx (B,T), G (B,T,d)."""
    idx, G = normalize_embedding_inputs(idx, G)
    b = _pick(backend, G)
    if b == "triton":
        from . import embedding_triton
        return embedding_triton.embedding_sqnorm(idx, G)
    return embedding_sqnorm_torch(idx, G)  # torch/cpp/cuda: the (B,T,T) Gram is tiny for class embedders


def embedding_clipped_sum(idx: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, num_embeddings: int, *,
                          backend: str = "auto") -> torch.Tensor:
    """sum_i coef_i grad_i of an Embedding: (num_embeddings, d). A scatter-add: the torch code
    serves every backend (the backend is still checked)."""
    idx, G = normalize_embedding_inputs(idx, G)
    _pick(backend, G)
    return embedding_clipped_sum_torch(idx, G, coef, num_embeddings)


__all__ = [
    "BACKENDS", "METHODS", "BackendUnavailableError", "resolve_backend", "available_backends", "backend_report",
    "choose_method",
    "per_example_sqnorm_linear", "clipped_sum_linear", "norm_affine_grads",
    "embedding_sqnorm", "embedding_clipped_sum",
    "per_example_sqnorm_linear_torch", "clipped_sum_linear_torch", "per_example_sqnorm_linear_loop",
    "norm_affine_grads_torch", "norm_affine_sqnorm_torch", "norm_affine_clipped_sum_torch",
    "embedding_sqnorm_torch", "embedding_clipped_sum_torch",
]
