"""Per-example gradient norms and clipped sums for Linear layers (the attention projections).

Shapes: A (B, T, d_in) layer inputs, G (B, T, d_out) gradients of the layer outputs, optional
mask (B, T) of 0/1 rows. A Linear on vectors is the case T = 1 (2-D A, G and a (B,) mask are
accepted). The per-example weight gradient is G_i^T A_i (d_out, d_in).

    ghost:       ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>       cost B*T^2*(d_in + d_out)
    fused:       sum of squares of G_i^T A_i, tile by tile          cost B*T*d_in*d_out, memory O(B + tile)
    materialize: sum((G_i^T A_i)^2)                                cost B*T*d_in*d_out, memory B*d_in*d_out
    clipped sum: sum_i c_i G_i^T A_i = (c * G)^T A over B*T rows    one GEMM
    bias:        per-example bias grad sum_t G_it; its norm is added when bias=True

This module holds the plain-PyTorch references (`*_torch`) and the thin wrappers of the C++
(`dpldm._C`, csrc/linear_ops.cpp) and CUDA (`dpldm._cuda`, csrc/cuda/) ops; the Triton kernels
are in the paired module kernels/linear_triton.py. Dispatch is in kernels/__init__.py.

Dtypes: fp16/bf16 inputs are accumulated in fp32 and the results are fp32; fp32 -> fp32,
fp64 -> fp64 (every backend).
"""
from __future__ import annotations

import torch

from .rules import METHODS, choose_method, say_once

GHOST_BLOCK = 256  # rows of the T x T Gram tiles in the ghost reference (bounds its memory)
FUSED_BLOCK = 64   # d_out rows per materialised slab in the torch "fused" reference


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / result dtype: fp32 for fp16/bf16, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def normalize_inputs(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None):
    """Validate and bring inputs to A (B,T,d_in), G (B,T,d_out) of one dtype, mask (B,T) or None."""
    if not (isinstance(A, torch.Tensor) and isinstance(G, torch.Tensor)):
        raise TypeError("A and G must be torch tensors")
    if A.dim() == 2 and G.dim() == 2:
        A, G = A.unsqueeze(1), G.unsqueeze(1)  # (B, d) -> (B, 1, d)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(1)
    if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(f"expected A (B,T,d_in) and G (B,T,d_out) with equal B,T; got {tuple(A.shape)} and {tuple(G.shape)}")
    if A.device != G.device:
        raise ValueError(f"A and G must be on one device, got {A.device} and {G.device}")
    if not (A.is_floating_point() and G.is_floating_point()):
        raise TypeError(f"A and G must be floating point, got {A.dtype} and {G.dtype}")
    if A.dtype != G.dtype:
        dt = torch.promote_types(A.dtype, G.dtype)
        A, G = A.to(dt), G.to(dt)
    if mask is not None:
        if mask.shape != A.shape[:2]:
            raise ValueError(f"mask must have shape (B,T)={tuple(A.shape[:2])}, got {tuple(mask.shape)}")
        if mask.device != A.device:
            raise ValueError(f"mask must be on {A.device}, got {mask.device}")
    return A, G, mask


def _check_coef(coef: torch.Tensor, B: int, device: torch.device) -> None:
    if not isinstance(coef, torch.Tensor) or coef.shape != (B,):
        raise ValueError(f"coef must be a tensor of shape (B,)=({B},), got {getattr(coef, 'shape', type(coef))}")
    if coef.device != device:
        raise ValueError(f"coef must be on {device}, got {coef.device}")


def resolve_method(method: str, T: int, d_in: int, d_out: int, backend: str) -> str:
    """The concrete method for `backend` ("auto": the fixed rule, registry.choose_method)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return choose_method(T, d_in, d_out, backend)
    if backend != "torch" and method == "materialize":
        return "fused"  # same numbers; the accelerated backends never write the per-example stack
    return method


# ---- bf16 on CUDA: tensor-core GEMMs with fp32 outputs -------------------------------------------
_OUT_DTYPE_OK: dict[str, bool] = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """Whether torch.bmm/mm take out_dtype= on this device (CUDA builds of torch >= 2.8); checked
    once on a 1x1 product. Without it the torch backend upcasts bf16 to fp32 (said once)."""
    key = str(device)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(1, 1, 1, dtype=torch.bfloat16, device=device)
            ok = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
            ok = ok and torch.mm(a[0], a[0], out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        if not ok:
            say_once(f"out_dtype@{key}", f"dpldm.kernels: torch {torch.__version__} has no bf16 GEMM with fp32 output "
                                         f"on {device}; the torch backend upcasts bf16 to fp32 there")
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


def tensor_cores(A: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """True where the torch reference feeds bf16 tiles to tensor cores (CUDA, bf16, no mask):
    torch.bmm/mm(..., out_dtype=torch.float32) multiply bf16 inputs exactly and accumulate in
    fp32, the same numbers as upcasting first, without the fp32 copies and at bf16 GEMM speed.
    Elsewhere (CPU, fp16, masked rows, a torch without out_dtype) the inputs are upcast to fp32."""
    return A.is_cuda and A.dtype == torch.bfloat16 and mask is None and _out_dtype_supported(A.device)


def _bmm32(a: torch.Tensor, b: torch.Tensor, tc: bool) -> torch.Tensor:
    """fp32 (or fp64) batched product; bf16 inputs on tensor cores when `tc`."""
    if tc:
        return torch.bmm(a, b, out_dtype=torch.float32)
    acc = acc_dtype(a.dtype)
    return torch.bmm(a.to(acc), b.to(acc))


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x -> (hi, lo) bf16 with hi + lo = x up to 2^-16 relative (hi = bf16(x), lo = bf16(x - hi)).

    Used by the clipped sum on tensor cores: (c_i G_i) is formed in fp32 from the SAME bf16 G
    the norm kernels read, then fed to two bf16 GEMMs (hi and lo) with fp32 accumulation, so
    each example's clipped contribution is c_i * G_i^T A_i to ~1e-5 relative: its norm stays
    <= C (up to that rounding) although c_i * G_i is not representable in bf16."""
    hi = x.to(torch.bfloat16)
    lo = (x - hi.to(x.dtype)).to(torch.bfloat16)
    return hi, lo


# ---- plain-PyTorch references ---------------------------------------------------------------
def per_example_sqnorm_linear_torch(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False,
                                    mask: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example gradients of a Linear layer (+ bias)."""
    A, G, mask = normalize_inputs(A, G, mask)
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    acc = acc_dtype(A.dtype)
    tc = tensor_cores(A, mask)
    if not tc:
        A, G = A.to(acc), G.to(acc)
    if mask is not None:
        G = G * mask.to(acc).unsqueeze(-1)  # masked rows contribute nothing
    method = resolve_method(method, T, d_in, d_out, "torch")
    out = torch.zeros(B, dtype=acc, device=A.device)
    if method == "ghost":
        for s in range(0, T, GHOST_BLOCK):  # tiles of rows of the T x T Gram matrices
            a_gram = _bmm32(A[:, s:s + GHOST_BLOCK], A.transpose(1, 2), tc)  # (B, tile, T)
            g_gram = _bmm32(G[:, s:s + GHOST_BLOCK], G.transpose(1, 2), tc)  # (B, tile, T)
            out += (a_gram * g_gram).sum(dim=(1, 2))
    elif method == "materialize":
        per_example = _bmm32(G.transpose(1, 2), A, tc)  # (B, d_out, d_in)
        out = per_example.pow(2).sum(dim=(1, 2))
    else:  # "fused" reference: the same sum, one (B, 64, d_in) slab of the stack at a time
        for o in range(0, d_out, FUSED_BLOCK):
            slab = _bmm32(G[:, :, o:o + FUSED_BLOCK].transpose(1, 2), A, tc)  # (B, tile, d_in)
            out += slab.pow(2).sum(dim=(1, 2))
    if bias:
        out = out + G.sum(dim=1, dtype=acc).pow(2).sum(dim=1)  # (B, d_out) bias gradients
    return out


def clipped_sum_linear_torch(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, *, bias: bool = False,
                             mask: torch.Tensor | None = None,
                             split: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i coef_i G_i^T A_i as (d_out, d_in), and sum_i coef_i sum_t G_it as (d_out,) if bias.

    split (bf16 only; default: on tensor cores, see `tensor_cores`): c*G is formed in fp32 and fed
    to the GEMM as bf16 hi + lo parts (`split_bf16`); otherwise A and G are upcast to fp32."""
    A, G, mask = normalize_inputs(A, G, mask)
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    _check_coef(coef, B, A.device)
    acc = acc_dtype(A.dtype)
    tc = tensor_cores(A) if split is None else (split and A.dtype == torch.bfloat16)
    scale = coef.to(acc).view(B, 1, 1)
    if mask is not None:
        scale = scale * mask.to(acc).unsqueeze(-1)
    Gc = G.to(acc) * scale  # (B, T, d_out), fp32 from the same G the norms read
    if tc:
        hi, lo = split_bf16(Gc.reshape(B * T, d_out))  # (B*T, d_out) each
        A2 = A.reshape(B * T, d_in)
        if A.is_cuda and _out_dtype_supported(A.device):
            weight = torch.mm(hi.t(), A2, out_dtype=torch.float32) + torch.mm(lo.t(), A2, out_dtype=torch.float32)
        else:  # the same arithmetic on CPU (tests): exact bf16 products, fp32 accumulation
            A2 = A2.to(acc)
            weight = hi.t().to(acc) @ A2 + lo.t().to(acc) @ A2  # (d_out, d_in)
    else:
        weight = Gc.reshape(B * T, d_out).t() @ A.to(acc).reshape(B * T, d_in)  # (d_out, d_in)
    bias_sum = Gc.sum(dim=(0, 1)) if bias else None
    return weight, bias_sum


def per_example_sqnorm_linear_loop(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False,
                                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Slow float64 per-example loop (the tests' ground truth): builds each G_i^T A_i."""
    A, G, mask = normalize_inputs(A, G, mask)
    out = torch.zeros(A.shape[0], dtype=torch.float64)
    for i in range(A.shape[0]):
        a, g = A[i].double().cpu(), G[i].double().cpu()
        if mask is not None:
            g = g * mask[i].double().cpu().unsqueeze(-1)
        out[i] = (g.t() @ a).pow(2).sum() + (g.sum(0).pow(2).sum() if bias else 0.0)
    return out


# ---- C++ (dpldm._C) and CUDA (dpldm._cuda) wrappers ---------------------------------------------
def per_example_sqnorm_linear_ext(ext, A, G, *, bias=False, mask=None, method="fused"):
    """Call the extension op; inputs already normalised; method is "ghost" or "fused"."""
    fn = ext.sqnorm_linear_ghost if method == "ghost" else ext.sqnorm_linear_fused
    return fn(A, G, mask, bool(bias))


def clipped_sum_linear_ext(ext, A, G, coef, *, bias=False, mask=None):
    res = ext.clipped_sum_linear(A, G, coef, mask, bool(bias))
    return res[0], (res[1] if bias else None)
