"""GPU checks: the compiled Triton kernels and the CUDA extension (dpldm._cuda) in fp32, fp16 and
bf16. Skipped, with the reason "needs a CUDA GPU", only where no GPU exists.

fp32: relative 1e-5 against a float64 loop. fp16/bf16 (flash-attention's rule): the kernel's
error against an fp32 reference on the same (rounded) inputs is at most 2x the error of plain
PyTorch computing the same thing in that dtype (bmm in the dtype), plus a float32 rounding floor.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import dpldm.kernels as K
from dpldm.kernels import dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = torch.device("cuda")
SHAPES = [(B, T, d_in, d_out) for B in (0, 1, 3) for T in (1, 3, 77) for (d_in, d_out) in ((24, 40), (40, 24))]
SHAPES += [(8, 256, 320, 320), (4, 1024, 128, 128), (16, 64, 640, 640)]  # attention projections


def gpu_backends() -> list[str]:
    out = ["triton"]
    if os.environ.get("DPLDM_SKIP_CUDA_BUILD") != "1":
        out.append("cuda")  # must be built where torch has CUDA; a failed build fails these tests
    return out


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make(B, T, d_in, d_out, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g).to(dtype)
    G = torch.randn(B, T, d_out, generator=g).to(dtype)
    mask = (torch.rand(B, T, generator=g) > 0.35).float() if masked else None
    coef = torch.rand(B, generator=g)
    return A, G, mask, coef


def cu(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
def test_gpu_fp32_matches_loop(backend, B, T, d_in, d_out):
    assert dispatch.why_unavailable(backend, DEV) is None, dispatch.why_unavailable(backend, DEV)
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, coef = make(B, T, d_in, d_out, torch.float32, masked)
        loop = K.per_example_sqnorm_linear_loop(A, G, bias=bias, mask=mask)
        Ad, Gd, md, cd = cu(A, G, mask, coef)
        for method in ("fused", "ghost"):
            out = K.per_example_sqnorm_linear(Ad, Gd, bias=bias, mask=md, method=method, backend=backend)
            assert out.device.type == "cuda" and rel(out, loop) < 1e-5, (method, bias, masked)
        W, b = K.clipped_sum_linear(Ad, Gd, cd, bias=bias, mask=md, backend=backend)
        Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double(), bias=bias,
                                            mask=None if mask is None else mask.double())
        assert rel(W, Wr) < 1e-5 and (not bias or rel(b, br) < 1e-5)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,d_in,d_out", [(3, 77, 40, 24), (8, 256, 320, 320), (4, 1024, 128, 128)])
def test_gpu_half_within_2x_torch_error(backend, dtype, B, T, d_in, d_out):
    A, G, mask, coef = make(B, T, d_in, d_out, dtype, masked=True, seed=1)
    Ad, Gd, md, cd = cu(A, G, mask, coef)
    # fp32 references on the rounded inputs
    ref = K.per_example_sqnorm_linear_torch(Ad.float(), Gd.float(), bias=True, mask=md, method="materialize")
    Wr, br = K.clipped_sum_linear_torch(Ad.float(), Gd.float(), cd, bias=True, mask=md)
    # plain PyTorch in the low dtype
    Gm = Gd * md.to(dtype).unsqueeze(-1)
    t_norm = torch.bmm(Gm.transpose(1, 2), Ad).float().pow(2).sum((1, 2)) + Gm.sum(1).float().pow(2).sum(1)
    Gc = Gm * cd.to(dtype).view(-1, 1, 1)
    t_W = Gc.reshape(-1, d_out).t() @ Ad.reshape(-1, d_in)
    t_b = Gc.sum((0, 1))
    floor = 1e-6
    torch_err = rel(t_norm, ref)
    for method in ("fused", "ghost"):
        out = K.per_example_sqnorm_linear(Ad, Gd, bias=True, mask=md, method=method, backend=backend)
        assert out.dtype == torch.float32
        assert rel(out, ref) <= 2 * torch_err + floor, (method, rel(out, ref), torch_err)
    W, b = K.clipped_sum_linear(Ad, Gd, cd, bias=True, mask=md, backend=backend)
    assert W.dtype == torch.float32
    assert rel(W, Wr) <= 2 * rel(t_W, Wr) + floor
    assert rel(b, br) <= 2 * rel(t_b, br) + floor


def test_gpu_auto_picks_an_accelerated_backend():
    assert K.resolve_backend("auto", DEV) in ("triton", "cuda")
    A, G, mask, coef = cu(*make(3, 77, 40, 24, torch.float32, True))
    torch.testing.assert_close(K.per_example_sqnorm_linear(A, G, mask=mask),
                               K.per_example_sqnorm_linear(A, G, mask=mask, backend="torch"), rtol=1e-5, atol=0)


def test_gpu_norm_affine_and_embedding_half():
    for dtype in (torch.float16, torch.bfloat16):
        x, g = torch.randn(4, 256, 320, device=DEV).to(dtype), torch.randn(4, 256, 320, device=DEV).to(dtype)
        for got, want in zip(K.norm_affine_grads(x, g, backend="triton"), K.norm_affine_grads_torch(x, g)):
            assert got.dtype == torch.float32 and rel(got, want) < 1e-5
        idx = torch.randint(0, 7, (5, 33), device=DEV)
        G = torch.randn(5, 33, 64, device=DEV).to(dtype)
        assert rel(K.embedding_sqnorm(idx, G, backend="triton"), K.embedding_sqnorm_torch(idx, G)) < 1e-5


@pytest.mark.parametrize("backend", ["torch"] + gpu_backends())
@pytest.mark.parametrize("B,T,d_in,d_out", [(3, 77, 40, 24), (8, 256, 320, 320), (16, 64, 640, 640),
                                            (4, 1024, 128, 128)])
def test_gpu_bf16_norm_and_sum_read_the_same_inputs(backend, B, T, d_in, d_out):
    """bf16 on tensor cores (torch: bmm/mm out_dtype=fp32 and the hi/lo split; triton: tl.dot on bf16
    tiles): norms and sums equal the float64 result of the SAME bf16 values (exact products, fp32
    accumulation), and each example's clipped contribution has norm <= C (1 + 1e-4)."""
    A, G, _, _ = make(B, T, d_in, d_out, torch.bfloat16, masked=False, seed=2)
    Ad, Gd = cu(A, G)
    loop = K.per_example_sqnorm_linear_loop(A, G, bias=True)
    methods = ("materialize", "ghost") if backend == "torch" else ("fused", "ghost")
    for method in methods:
        out = K.per_example_sqnorm_linear(Ad, Gd, bias=True, method=method, backend=backend)
        assert out.dtype == torch.float32 and rel(out, loop) < 1e-4, (method, rel(out, loop))
    C = 0.1
    coef = (C / out.sqrt()).float()  # every example clipped to C
    W, b = K.clipped_sum_linear(Ad, Gd, coef, bias=True, backend=backend)
    Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double().cpu(), bias=True)
    assert W.dtype == torch.float32 and rel(W, Wr) < 1e-4 and rel(b, br) < 1e-4
    for i in range(min(B, 3)):
        e = torch.zeros_like(coef)
        e[i] = coef[i]
        Wi, bi = K.clipped_sum_linear(Ad, Gd, e, bias=True, backend=backend)
        n = float((Wi.double().pow(2).sum() + bi.double().pow(2).sum()).sqrt())
        assert n <= C * (1 + 1e-4), (backend, i, n / C)


def test_gpu_triton_autotune_runs_and_keeps_a_config():
    from dpldm.kernels import linear_triton as lt

    A, G, _, coef = cu(*make(8, 256, 320, 320, torch.bfloat16, False))
    K.per_example_sqnorm_linear(A, G, method="fused", backend="triton")
    K.clipped_sum_linear(A, G, coef, backend="triton")
    assert lt._tuned()
    assert lt._fused_sqnorm_tuned().best_config is not None and lt._clipped_sum_tuned().best_config is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_selector_measures_and_matches_loop(dtype, tmp_path):
    from dpldm.kernels.registry import LinearShape
    from dpldm.kernels.selection import KernelSelector

    sel = KernelSelector(16, cache_path=tmp_path / "k.json")
    A, G, _, coef = make(16, 64, 320, 320, dtype, False)
    Ad, Gd, cd = cu(A, G, coef)
    out = K.per_example_sqnorm_linear(Ad, Gd, bias=True, selector=sel)
    assert rel(out, K.per_example_sqnorm_linear_loop(A, G, bias=True)) < 1e-4
    W, _ = K.clipped_sum_linear(Ad, Gd, cd, selector=sel)
    assert rel(W, K.clipped_sum_linear_torch(A.double(), G.double(), coef.double())[0]) < 1e-4
    key = sel.key("linear_sqnorm", DEV, dtype, LinearShape(64, 320, 320, True))
    entry = sel.choices[key]
    assert len(entry.times_ms) >= 3 and entry.choice == min(entry.times_ms, key=entry.times_ms.get)
    print(sel.summary())
