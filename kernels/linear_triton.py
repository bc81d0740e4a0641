"""Triton kernels for the Linear-layer ops of kernels/linear.py (the references are the
`*_torch` functions there; tests/test_kernels_triton.py compares the two).

Imported lazily by kernels/__init__.py on the first Triton call, so TRITON_INTERPRET=1 (the CPU
interpreter, used by the tests) takes effect whenever it is set before that call.

Kernels (A (B,T,d_in), G (B,T,d_out), mask (B,T), coef (B,); any strides):
  _fused_sqnorm_kernel   grid (B, tiles of d_out x d_in): each program accumulates its
                         BLOCK_O x BLOCK_I tile of G_i^T A_i over T with tl.dot, squares and sums
                         it in registers and writes one fp32 partial; (B, n_tiles) partials are
                         summed on the host in a fixed order. Never writes B*d_out*d_in.
  _ghost_sqnorm_kernel   grid (B, tile pairs s <= r of the T x T Gram matrices): each program
                         builds A_s A_r^T and G_s G_r^T tiles (reduced over d) in registers and
                         writes w * sum(a_gram * g_gram) (w = 2 off the diagonal). Never holds
                         B*T*T. The bias norm ||sum_t G_t||^2 = sum of the G Gram is fused in.
  _clipped_sum_kernel    grid (d_out tiles, d_in tiles, SPLIT of the B*T rows): GEMM over the
                         flattened rows with the row scale coef_i * mask_it applied to the G tile
                         right after loading (the scaling fused into the GEMM); per-split fp32
                         partials are summed on the host (deterministic, no atomics).
Precision: fp32 inputs use input_precision="ieee" (no TF32); fp16/bf16 feed tl.dot natively
(tensor cores) with fp32 accumulation. The clipped sum forms c_i*G (fp32) and feeds it as hi + lo
parts in the input dtype (two tl.dot on the same A tile), so each example's clipped contribution
is computed from the same inputs as its norm (~2^-16 relative) and its norm stays <= C. Under the
interpreter every tile is cast to fp32 right after tl.load (the interpreter computes bf16 wrongly
without error) and the block sizes are fixed; compiled on a GPU the fused norm and the clipped
sum are autotuned (triton.autotune over block sizes, warps, stages, keyed on T, d_in, d_out and
the dtype; DPLDM_TRITON_AUTOTUNE=0 keeps the fixed blocks).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreting

INTERPRET = triton_interpreting()  # fixed when this module is imported, like triton.jit itself

_TL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
@triton.jit
def _fused_sqnorm_kernel(A, G, M, OUT, T, D_IN, D_OUT,
                         sab, sat, sad, sgb, sgt, sgd, smb, smt, out_stride,
                         HAS_MASK: tl.constexpr, BIAS: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_tile = tl.program_id(1)
    n_tiles_in = tl.cdiv(D_IN, BLOCK_I)
    pid_o = pid_tile // n_tiles_in
    pid_i = pid_tile % n_tiles_in
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BO,)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # (BI,)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    a_base = A + pid_b.to(tl.int64) * sab
    g_base = G + pid_b.to(tl.int64) * sgb
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # (BT,)
        tm = offs_t < T
        g = tl.load(g_base + offs_t[:, None] * sgt + offs_o[None, :] * sgd,
                    mask=tm[:, None] & (offs_o[None, :] < D_OUT), other=0.0)  # (BT, BO)
        a = tl.load(a_base + offs_t[:, None] * sat + offs_i[None, :] * sad,
                    mask=tm[:, None] & (offs_i[None, :] < D_IN), other=0.0)  # (BT, BI)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        if HAS_MASK:
            mv = tl.load(M + pid_b * smb + offs_t * smt, mask=tm, other=0.0)  # (BT,) fp32
            g = (g.to(tl.float32) * mv[:, None]).to(g.dtype)  # 0/1 rows: exact in any dtype
        if UPCAST:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")  # (BO, BI)
        else:
            acc = tl.dot(tl.trans(g), a, acc)
        if BIAS:
            bacc += tl.sum(g.to(tl.float32), axis=0)
    s = tl.sum(acc * acc)
    if BIAS:
        s += tl.where(pid_i == 0, tl.sum(bacc * bacc), 0.0)
    tl.store(OUT + pid_b * out_stride + pid_tile, s)


@triton.jit
def _ghost_sqnorm_kernel(A, G, M, PAIRS, OUT, T, D_IN, D_OUT,
                         sab, sat, sad, sgb, sgt, sgd, smb, smt, n_pairs,
                         HAS_MASK: tl.constexpr, BIAS: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    sblk = tl.load(PAIRS + 2 * pid_p)
    rblk = tl.load(PAIRS + 2 * pid_p + 1)
    offs_s = sblk * BLOCK_S + tl.arange(0, BLOCK_S)  # (BS,) rows of the left tile
    offs_r = rblk * BLOCK_S + tl.arange(0, BLOCK_S)  # (BS,) rows of the right tile
    sm = offs_s < T
    rm = offs_r < T
    a_base = A + pid_b.to(tl.int64) * sab
    g_base = G + pid_b.to(tl.int64) * sgb
    ga = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D_IN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < D_IN
        a_s = tl.load(a_base + offs_s[:, None] * sat + offs_d[None, :] * sad, mask=sm[:, None] & dm[None, :], other=0.0)
        a_r = tl.load(a_base + offs_r[:, None] * sat + offs_d[None, :] * sad, mask=rm[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            ga = tl.dot(a_s.to(tl.float32), tl.trans(a_r.to(tl.float32)), ga, input_precision="ieee")  # (BS, BS)
        else:
            ga = tl.dot(a_s, tl.trans(a_r), ga)
    gg = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D_OUT, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < D_OUT
        g_s = tl.load(g_base + offs_s[:, None] * sgt + offs_d[None, :] * sgd, mask=sm[:, None] & dm[None, :], other=0.0)
        g_r = tl.load(g_base + offs_r[:, None] * sgt + offs_d[None, :] * sgd, mask=rm[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            gg = tl.dot(g_s.to(tl.float32), tl.trans(g_r.to(tl.float32)), gg, input_precision="ieee")  # (BS, BS)
        else:
            gg = tl.dot(g_s, tl.trans(g_r), gg)
    if HAS_MASK:
        ms = tl.load(M + pid_b * smb + offs_s * smt, mask=sm, other=0.0)
        mr = tl.load(M + pid_b * smb + offs_r * smt, mask=rm, other=0.0)
        gg = gg * ms[:, None] * mr[None, :]
    w = tl.where(sblk == rblk, 1.0, 2.0)
    val = tl.sum(ga * gg)
    if BIAS:
        val += tl.sum(gg)
    tl.store(OUT + pid_b * n_pairs + pid_p, val * w)


@triton.jit
def _clipped_sum_kernel(A, G, COEF, M, WOUT, BOUT, T, ROWS, D_IN, D_OUT,
                        sab, sat, sad, sgb, sgt, sgd, smb, smt, rows_per_split,
                        HAS_MASK: tl.constexpr, BIAS: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    om = offs_o < D_OUT
    im = offs_i < D_IN
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    k_start = pid_k * rows_per_split
    k_end = tl.minimum(k_start + rows_per_split, ROWS)
    for k0 in range(k_start, k_end, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)  # flattened (i, t) rows
        rmask = rows < k_end
        bi = (rows // T).to(tl.int64)
        ti = rows % T
        g = tl.load(G + bi[:, None] * sgb + ti[:, None] * sgt + offs_o[None, :] * sgd,
                    mask=rmask[:, None] & om[None, :], other=0.0)  # (BK, BO)
        a = tl.load(A + bi[:, None] * sab + ti[:, None] * sat + offs_i[None, :] * sad,
                    mask=rmask[:, None] & im[None, :], other=0.0)  # (BK, BI)
        c = tl.load(COEF + bi, mask=rmask, other=0.0)  # (BK,) fp32
        if HAS_MASK:
            c = c * tl.load(M + bi * smb + ti * smt, mask=rmask, other=0.0)
        gs = g.to(tl.float32) * c[:, None]  # fused row scaling, fp32
        if UPCAST:
            acc = tl.dot(tl.trans(gs), a.to(tl.float32), acc, input_precision="ieee")  # (BO, BI)
        else:  # tensor cores: c*G (fp32) as hi + lo in the input dtype, both against the same A tile,
            # so the sum is c_i * G_i^T A_i of the very inputs the norm kernels read (to ~2^-16)
            hi = gs.to(a.dtype)
            lo = (gs - hi.to(tl.float32)).to(a.dtype)
            acc = tl.dot(tl.trans(hi), a, acc)
            acc = tl.dot(tl.trans(lo), a, acc)
        if BIAS:
            bacc += tl.sum(gs, axis=0)
    base = pid_k.to(tl.int64) * D_OUT * D_IN
    tl.store(WOUT + base + offs_o[:, None] * D_IN + offs_i[None, :], acc, mask=om[:, None] & im[None, :])
    if BIAS:
        if pid_i == 0:
            tl.store(BOUT + pid_k * D_OUT + offs_o, bacc, mask=om)


# ------------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _check(A: torch.Tensor) -> None:
    if A.dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton kernels take fp16, bf16 or fp32 inputs, got {A.dtype}")
    if A.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before the first "
                           "Triton use (the interpreter is slow, for tests)")


def _mask_arg(mask, A):
    if mask is None:
        return A, 0, 0  # dummy pointer, never read (HAS_MASK=False)
    m = mask.to(torch.float32)
    return m, m.stride(0), m.stride(1)


def _upcast(A: torch.Tensor) -> bool:
    return INTERPRET or A.dtype == torch.float32


def sqnorm_fused(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None = None, bias: bool = False) -> torch.Tensor:
    """(B,) fp32 ||G_i^T A_i||^2 (+ bias norm). A (B,T,d_in), G (B,T,d_out), same dtype/device."""
    _check(A)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    if B == 0:
        return torch.zeros(0, dtype=torch.float32, device=A.device)
    m, smb, smt = _mask_arg(mask, A)
    flags = dict(HAS_MASK=mask is not None, BIAS=bool(bias), UPCAST=_upcast(A))
    if _tuned():  # compiled on a GPU: block sizes, warps and stages autotuned per (T, d_in, d_out, dtype)
        n_max = triton.cdiv(d_out, _MIN_TILE) * triton.cdiv(d_in, _MIN_TILE)
        part = torch.zeros(B, n_max, dtype=torch.float32, device=A.device)  # unused tiles stay 0

        def grid(meta):
            return (B, triton.cdiv(d_out, meta["BLOCK_O"]) * triton.cdiv(d_in, meta["BLOCK_I"]))
        _fused_sqnorm_tuned()[grid](A, G, m, part, T, d_in, d_out, *A.stride(), *G.stride(), smb, smt, n_max,
                                    **flags)
        return part.sum(dim=1)
    BO, BI = _pow2(d_out), _pow2(d_in)
    BT = _pow2(T, 16, 64 if INTERPRET else 32)
    n_in, n_o = triton.cdiv(d_in, BI), triton.cdiv(d_out, BO)
    part = torch.empty(B, n_o * n_in, dtype=torch.float32, device=A.device)  # (B, n_tiles)
    _fused_sqnorm_kernel[(B, n_o * n_in)](
        A, G, m, part, T, d_in, d_out, *A.stride(), *G.stride(), smb, smt, n_o * n_in,
        **flags, BLOCK_T=BT, BLOCK_O=BO, BLOCK_I=BI)
    return part.sum(dim=1)


def sqnorm_ghost(A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None = None, bias: bool = False) -> torch.Tensor:
    """(B,) fp32 <A_i A_i^T, G_i G_i^T> (+ bias norm), on BLOCK_S x BLOCK_S tiles of the Grams."""
    _check(A)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    if B == 0:
        return torch.zeros(0, dtype=torch.float32, device=A.device)
    BS = _pow2(T, 16, 64)
    BD = _pow2(max(d_in, d_out), 16, 64 if INTERPRET else 32)
    nt = triton.cdiv(T, BS)
    pairs = torch.tensor([(s, r) for r in range(nt) for s in range(r + 1)], dtype=torch.int32, device=A.device)
    n_pairs = pairs.shape[0]
    part = torch.empty(B, n_pairs, dtype=torch.float32, device=A.device)  # (B, n_pairs)
    m, smb, smt = _mask_arg(mask, A)
    _ghost_sqnorm_kernel[(B, n_pairs)](
        A, G, m, pairs, part, T, d_in, d_out, *A.stride(), *G.stride(), smb, smt, n_pairs,
        HAS_MASK=mask is not None, BIAS=bool(bias), UPCAST=_upcast(A), BLOCK_S=BS, BLOCK_D=BD)
    return part.sum(dim=1)


def clipped_sum(A: torch.Tensor, G: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor | None = None,
                bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_i coef_i G_i^T A_i (d_out, d_in) fp32, bias sum (d_out,) fp32 or None)."""
    _check(A)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    rows = B * T
    if rows == 0:
        w = torch.zeros(d_out, d_in, dtype=torch.float32, device=A.device)
        return w, (torch.zeros(d_out, dtype=torch.float32, device=A.device) if bias else None)
    c = coef.to(device=A.device, dtype=torch.float32).contiguous()
    m, smb, smt = _mask_arg(mask, A)
    flags = dict(HAS_MASK=mask is not None, BIAS=bool(bias), UPCAST=_upcast(A))
    if _tuned():
        # splits of the B*T rows sized independently of the tuned BLOCK_K (a multiple of every
        # BLOCK_K), so each config writes every partial: about 4 programs per SM at 64x64 tiles
        sms = _sms(A.device)
        tiles = triton.cdiv(d_out, 64) * triton.cdiv(d_in, 64)
        split = max(1, min(triton.cdiv(rows, 256), (4 * sms) // max(1, tiles)))
        rows_per_split = triton.cdiv(triton.cdiv(rows, split), 128) * 128
        split = triton.cdiv(rows, rows_per_split)
        wpart = torch.empty(split, d_out, d_in, dtype=torch.float32, device=A.device)
        bpart = torch.empty(split, d_out, dtype=torch.float32, device=A.device) if bias else wpart

        def grid(meta):
            return (triton.cdiv(d_out, meta["BLOCK_O"]), triton.cdiv(d_in, meta["BLOCK_I"]), split)
        _clipped_sum_tuned()[grid](A, G, c, m, wpart, bpart, T, rows, d_in, d_out, *A.stride(), *G.stride(),
                                   smb, smt, rows_per_split, **flags)
    else:
        BO, BI = _pow2(d_out), _pow2(d_in)
        BK = _pow2(rows, 16, 64 if INTERPRET else 32)
        n_o, n_i = triton.cdiv(d_out, BO), triton.cdiv(d_in, BI)
        n_k = triton.cdiv(rows, BK)
        if INTERPRET or A.device.type != "cuda":
            split = 1
        else:  # enough programs to fill the GPU: about 4 per SM
            sms = torch.cuda.get_device_properties(A.device).multi_processor_count
            split = max(1, min(n_k, (4 * sms) // max(1, n_o * n_i)))
        rows_per_split = triton.cdiv(n_k, split) * BK
        split = triton.cdiv(rows, rows_per_split)
        wpart = torch.empty(split, d_out, d_in, dtype=torch.float32, device=A.device)
        bpart = torch.zeros(split, d_out, dtype=torch.float32, device=A.device) if bias else wpart
        _clipped_sum_kernel[(n_o, n_i, split)](
            A, G, c, m, wpart, bpart, T, rows, d_in, d_out, *A.stride(), *G.stride(), smb, smt, rows_per_split,
            **flags, BLOCK_K=BK, BLOCK_O=BO, BLOCK_I=BI)
    w = wpart[0] if split == 1 else wpart.sum(dim=0)
    b = (bpart[0] if split == 1 else bpart.sum(dim=0)) if bias else None
    return w, b


# ---- autotuning (compiled GPU only; the interpreter keeps the fixed blocks above) -----------------------
_MIN_TILE = 32  # smallest BLOCK_O / BLOCK_I of the tuned configs (sizes the norm's partials)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _tuned() -> bool:
    return not INTERPRET and os.environ.get("DPLDM_TRITON_AUTOTUNE", "1") != "0"


def _cfg(bt, bo, bi, warps, stages, k="BLOCK_T"):
    return triton.Config({k: bt, "BLOCK_O": bo, "BLOCK_I": bi}, num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    """Drop tiles far wider than the layer (a 128-wide tile on d = 40 wastes 2/3 of the work)."""
    d_in, d_out = named_args["D_IN"], named_args["D_OUT"]
    keep = [c for c in configs if c.kwargs["BLOCK_O"] <= max(_MIN_TILE, triton.next_power_of_2(d_out))
            and c.kwargs["BLOCK_I"] <= max(_MIN_TILE, triton.next_power_of_2(d_in))]
    return keep or configs[:1]


# bf16/fp16 tiles feed tensor cores (wgmma on sm_90): 64-128 wide, 3-4 stages; fp32 ("ieee", no TF32)
# runs on CUDA cores and takes the smaller ones (configs that do not fit are skipped by the tuner).
_FUSED_CONFIGS = [_cfg(bt, bo, bi, w, st) for (bt, bo, bi, w, st) in (
    (32, 32, 32, 4, 2), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 128, 8, 3),
    (32, 128, 128, 8, 4))]
_CSUM_CONFIGS = [_cfg(bk, bo, bi, w, st, "BLOCK_K") for (bk, bo, bi, w, st) in (
    (32, 32, 32, 4, 2), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 128, 8, 3),
    (32, 128, 128, 8, 4))]


@functools.lru_cache(maxsize=None)
def _fused_sqnorm_tuned():
    return triton.autotune(configs=_FUSED_CONFIGS, key=["T", "D_IN", "D_OUT"], reset_to_zero=["OUT"],
                           prune_configs_by={"early_config_prune": _prune})(_fused_sqnorm_kernel)


@functools.lru_cache(maxsize=None)
def _clipped_sum_tuned():
    return triton.autotune(configs=_CSUM_CONFIGS, key=["T", "D_IN", "D_OUT"],
                           prune_configs_by={"early_config_prune": _prune})(_clipped_sum_kernel)
