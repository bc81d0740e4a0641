"""Triton kernels (kernels/*_triton.py) against the torch references and float64 loops, fp32.

On a machine without a GPU they run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where only fp32 is trustworthy, so shapes stay small. With a GPU the same
tests run compiled on CUDA tensors; fp16/bf16 are in test_kernels_gpu.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import dpldm.kernels as K
from dpldm.kernels import dispatch
from helpers import make, rel

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WHY = dispatch.why_unavailable("triton", DEV)
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"triton backend unavailable: {WHY}")

SHAPES = [(B, T, d_in, d_out) for B in (0, 1, 3) for T in (1, 3, 77) for (d_in, d_out) in ((24, 40), (40, 24))]


def dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
def test_triton_norms_match_reference_and_loop(B, T, d_in, d_out):
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, _ = make(B, T, d_in, d_out, masked=masked)
        loop = K.per_example_sqnorm_linear_loop(A, G, bias=bias, mask=mask)
        ref = K.per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method="materialize")
        Ad, Gd, md = dev(A, G, mask)
        for method in ("fused", "ghost"):
            out = K.per_example_sqnorm_linear(Ad, Gd, bias=bias, mask=md, method=method, backend="triton")
            assert out.shape == (B,) and out.dtype == torch.float32 and out.device.type == DEV.type
            assert rel(out, ref) < 1e-5 and rel(out, loop) < 1e-5, (method, bias, masked)


@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
def test_triton_clipped_sum_matches_reference(B, T, d_in, d_out):
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, coef = make(B, T, d_in, d_out, masked=masked)
        W, b = K.clipped_sum_linear(*dev(A, G, coef), bias=bias, mask=dev(mask)[0], backend="triton")
        Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double(), bias=bias,
                                            mask=None if mask is None else mask.double())
        assert W.shape == (d_out, d_in) and W.dtype == torch.float32 and rel(W, Wr) < 1e-5
        assert (b is None) == (not bias)
        if bias:
            assert rel(b, br) < 1e-5


def test_triton_mask_weights_and_seeds():
    """Non-binary row weights and a different seed on the largest odd shape."""
    for bias, masked in itertools.product((False, True), (False, True)):
        A, G, mask, coef = make(3, 77, 40, 24, masked=masked, seed=3)
        if mask is not None:
            mask = mask * torch.rand(mask.shape)
        ref = K.per_example_sqnorm_linear_loop(A, G, bias=bias, mask=mask)
        Ad, Gd, md, cd = dev(A, G, mask, coef)
        for method in ("fused", "ghost"):
            assert rel(K.per_example_sqnorm_linear(Ad, Gd, bias=bias, mask=md, method=method, backend="triton"), ref) < 1e-5
        W, b = K.clipped_sum_linear(Ad, Gd, cd, bias=bias, mask=md, backend="triton")
        Wr, br = K.clipped_sum_linear_torch(A, G, coef, bias=bias, mask=mask)
        assert rel(W, Wr) < 1e-5 and (not bias or rel(b, br) < 1e-5)


def test_triton_several_tiles_and_strides():
    """T over two ghost tiles and d over two fused tiles; non-contiguous A."""
    A, G, mask, coef = make(2, 70, 80, 72, masked=True, seed=1)
    At = A.transpose(0, 1).contiguous().transpose(0, 1)
    ref = K.per_example_sqnorm_linear_loop(A, G, bias=True, mask=mask)
    Ad, Gd, md, cd = dev(At, G, mask, coef)
    for method in ("fused", "ghost"):
        assert rel(K.per_example_sqnorm_linear(Ad, Gd, bias=True, mask=md, method=method, backend="triton"), ref) < 1e-5
    W, b = K.clipped_sum_linear(Ad, Gd, cd, bias=True, mask=md, backend="triton")
    Wr, br = K.clipped_sum_linear_torch(A, G, coef, bias=True, mask=mask)
    assert rel(W, Wr) < 1e-5 and rel(b, br) < 1e-5


def test_triton_two_dim_inputs():
    A, G, mask, coef = make(5, 1, 24, 40, masked=True)
    out = K.per_example_sqnorm_linear(*dev(A[:, 0], G[:, 0]), bias=True, mask=dev(mask[:, 0])[0], backend="triton")
    assert rel(out, K.per_example_sqnorm_linear_loop(A, G, bias=True, mask=mask)) < 1e-5


def test_triton_norm_affine_and_embedding():
    x, g = torch.randn(3, 77, 40), torch.randn(3, 77, 40)
    xs = torch.randn(3, 40, 77).transpose(1, 2)  # GroupNorm-style strided view
    for xx in (x, xs):
        for got, want in zip(K.norm_affine_grads(*dev(xx, g), backend="triton"), K.norm_affine_grads_torch(xx, g)):
            assert got.shape == want.shape and rel(got, want) < 1e-5
    gw, gb = K.norm_affine_grads(*dev(x[:0], g[:0]), backend="triton")
    assert gw.shape == (0, 40) and gb.shape == (0, 40)
    for B, T in ((0, 1), (1, 1), (4, 1), (3, 77)):
        idx = torch.randint(0, 5, (B, T))
        G = torch.randn(B, T, 24)
        out = K.embedding_sqnorm(*dev(idx, G), backend="triton")
        assert out.shape == (B,) and rel(out, K.embedding_sqnorm_torch(idx.double().long(), G.double())) < 1e-5
    idx, G, coef = torch.randint(0, 5, (4, 3)), torch.randn(4, 3, 24), torch.rand(4)
    torch.testing.assert_close(K.embedding_clipped_sum(*dev(idx, G, coef), 5, backend="triton").cpu(),
                               K.embedding_clipped_sum_torch(idx, G, coef, 5))


def test_triton_rejects_fp64_explicitly_and_auto_avoids_it():
    A, G, _, _ = make(2, 3, 24, 40)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        K.per_example_sqnorm_linear(*dev(A.double(), G.double()), backend="triton")


@pytest.mark.parametrize("which", ["fused", "csum"])
def test_every_autotune_config_is_correct(monkeypatch, which):
    """The autotuned launch path (grid from the config, zeroed partials, row splits independent of
    BLOCK_K) with each config alone, against the float64 loop. Compiled GPUs benchmark the configs;
    here each one runs by itself (a one-config autotuner does not benchmark)."""
    import triton

    from dpldm.kernels import linear_triton as lt

    configs = lt._FUSED_CONFIGS if which == "fused" else lt._CSUM_CONFIGS
    A, G, mask, coef = make(4, 70, 72, 40, masked=True, seed=5)  # 280 rows: the clipped sum takes 2 row splits
    Ad, Gd, md, cd = dev(A, G, mask, coef)
    monkeypatch.setattr(lt, "_tuned", lambda: True)
    monkeypatch.setattr(lt, "_sms", lambda device: 1)
    for cfg in configs:
        if which == "fused":
            tuned = triton.autotune(configs=[cfg], key=["T", "D_IN", "D_OUT"], reset_to_zero=["OUT"])(
                lt._fused_sqnorm_kernel)
            monkeypatch.setattr(lt, "_fused_sqnorm_tuned", lambda t=tuned: t)
            got = lt.sqnorm_fused(Ad, Gd, md, True)
            assert rel(got, K.per_example_sqnorm_linear_loop(A, G, bias=True, mask=mask)) < 1e-5, cfg
        else:
            tuned = triton.autotune(configs=[cfg], key=["T", "D_IN", "D_OUT"])(lt._clipped_sum_kernel)
            monkeypatch.setattr(lt, "_clipped_sum_tuned", lambda t=tuned: t)
            launches = []
            monkeypatch.setattr(tuned, "run", lambda *a, _run=tuned.run, **k: launches.append(k["grid"]) or _run(*a, **k))
            W, b = lt.clipped_sum(Ad, Gd, cd, md, True)
            assert len(launches) == 1 and launches[0]({**cfg.kwargs})[2] == 2
            Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double(), bias=True, mask=mask.double())
            assert rel(W, Wr) < 1e-5 and rel(b, br) < 1e-5, cfg
    assert lt._prune(configs, {"D_IN": 40, "D_OUT": 24}) and all(
        c.kwargs["BLOCK_O"] <= 32 and c.kwargs["BLOCK_I"] <= 64 for c in lt._prune(configs, {"D_IN": 40, "D_OUT": 24}))
