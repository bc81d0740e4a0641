"""The C++/OpenMP extension dpldm._C (csrc/): fused and ghost norms, clipped sum and norm-affine
grads against the torch references and float64 loops; input checks; thread-count invariance;
the O(B + tile) workspace. (Secure noise: test_secure_noise.py.)"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpldm.kernels as K
from dpldm.kernels import dispatch
from helpers import make, rel

C = dispatch.cpp_ext()
pytestmark = pytest.mark.skipif(C is None, reason="dpldm._C is not built (python setup.py build_ext --inplace)")

SHAPES = [(B, T, d_in, d_out) for B in (0, 1, 3) for T in (1, 3, 77) for (d_in, d_out) in ((24, 40), (40, 24))]
SHAPES += [(2, 130, 70, 33), (5, 257, 24, 130)]  # several T tiles (ghost) / K chunks / d panels


@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
def test_cpp_norms_match_reference_and_loop(B, T, d_in, d_out):
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, _ = make(B, T, d_in, d_out, masked=masked)
        loop = K.per_example_sqnorm_linear_loop(A, G, bias=bias, mask=mask)
        ref = K.per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method="materialize")
        for method in ("fused", "ghost", "materialize", "auto"):
            out = K.per_example_sqnorm_linear(A, G, bias=bias, mask=mask, method=method, backend="cpp")
            assert out.shape == (B,) and out.dtype == torch.float32
            assert rel(out, ref) < 1e-5 and rel(out, loop) < 1e-5, (method, bias, masked)


@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
def test_cpp_clipped_sum_matches_reference(B, T, d_in, d_out):
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, coef = make(B, T, d_in, d_out, masked=masked)
        W, b = K.clipped_sum_linear(A, G, coef, bias=bias, mask=mask, backend="cpp")
        Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double(), bias=bias,
                                            mask=None if mask is None else mask.double())
        assert W.shape == (d_out, d_in) and W.dtype == torch.float32 and rel(W, Wr) < 1e-5
        assert (b is None) == (not bias)
        if bias:
            assert rel(b, br) < 1e-5


@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 4), T=st.integers(1, 70), d_in=st.integers(1, 70), d_out=st.integers(1, 70),
       bias=st.booleans(), masked=st.booleans())
def test_cpp_random_shapes(B, T, d_in, d_out, bias, masked):
    A, G, mask, coef = make(B, T, d_in, d_out, masked=masked, seed=B * 7 + T)
    ref = K.per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method="materialize")
    for method in ("fused", "ghost"):
        assert rel(K.per_example_sqnorm_linear(A, G, bias=bias, mask=mask, method=method, backend="cpp"), ref) < 1e-5
    W, _ = K.clipped_sum_linear(A, G, coef, mask=mask, backend="cpp")
    assert rel(W, K.clipped_sum_linear_torch(A, G, coef, mask=mask)[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_dtypes(dtype):
    """fp16/bf16 are converted to fp32 on load (exact) and accumulated in fp32: they must match
    the fp32 reference on the same (upcast) values; fp64 stays fp64."""
    A, G, mask, coef = make(3, 77, 40, 24, dtype=dtype, masked=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    ref = K.per_example_sqnorm_linear_torch(A.to(acc), G.to(acc), bias=True, mask=mask, method="materialize")
    for method in ("fused", "ghost"):
        out = K.per_example_sqnorm_linear(A, G, bias=True, mask=mask, method=method, backend="cpp")
        assert out.dtype == acc and rel(out, ref) < tol
    W, b = K.clipped_sum_linear(A, G, coef, bias=True, mask=mask, backend="cpp")
    Wr, br = K.clipped_sum_linear_torch(A.to(acc), G.to(acc), coef.to(acc), bias=True, mask=mask)
    assert W.dtype == acc and rel(W, Wr) < tol and rel(b, br) < tol
    x, g = torch.randn(3, 5, 24).to(dtype), torch.randn(3, 5, 24).to(dtype)
    for got, want in zip(K.norm_affine_grads(x, g, backend="cpp"), K.norm_affine_grads_torch(x, g)):
        assert got.dtype == want.dtype and rel(got, want) < tol


def test_cpp_results_do_not_depend_on_thread_count():
    A, G, mask, coef = make(3, 200, 70, 90, masked=True)  # B=3 >= 2 threads and B < 4 threads paths
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append([C.sqnorm_linear_fused(A, G, mask, True), C.sqnorm_linear_ghost(A, G, mask, True),
                         *C.clipped_sum_linear(A, G, coef, mask, True)])
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert torch.equal(x, y)


def test_cpp_strided_inputs():
    A, G, mask, coef = make(4, 9, 24, 40, masked=True)
    At = A.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not At.is_contiguous()
    torch.testing.assert_close(K.per_example_sqnorm_linear(At, G, mask=mask, backend="cpp"),
                               K.per_example_sqnorm_linear(A, G, mask=mask, backend="cpp"))
    x = torch.randn(2, 24, 15)  # GroupNorm layout (B, C, HW) viewed as (B, HW, C)
    g = torch.randn(2, 24, 15)
    for got, want in zip(K.norm_affine_grads(x.transpose(1, 2), g.transpose(1, 2), backend="cpp"),
                         K.norm_affine_grads_torch(x.transpose(1, 2), g.transpose(1, 2))):
        assert rel(got, want) < 1e-5


def test_cpp_input_checks_name_the_op():
    A, G, mask, coef = make(2, 3, 24, 40, masked=True)
    with pytest.raises(RuntimeError, match="sqnorm_linear_fused: expected A"):
        C.sqnorm_linear_fused(A[0], G[0], None, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        C.sqnorm_linear_ghost(A, G.double(), None, False)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        C.sqnorm_linear_fused(A, G, mask[:, :2], False)
    with pytest.raises(RuntimeError, match="coef must have shape"):
        C.clipped_sum_linear(A, G, coef[:1], None, False)
    with pytest.raises(RuntimeError, match="floating point"):
        C.sqnorm_linear_fused(A.long(), G.long(), None, False)


def test_cpp_fused_workspace_is_O_B_plus_tile():
    """The fused/ghost norms allocate per-thread tile buffers only: the workspace does not grow
    with B and is far below the B*d_in*d_out per-example stack."""
    T, d = 256, 640
    ws = C.fused_workspace_bytes(T, d, d, 4)
    ghost_ws = C.ghost_workspace_bytes(T, d, d, 4)
    stack_one_example = d * d * 4
    assert ws < 2 * stack_one_example * torch.get_num_threads()
    for B in (64, 256):
        assert ws + 4 * B < B * stack_one_example / 20
        assert ghost_ws + 4 * B < B * stack_one_example / 20
