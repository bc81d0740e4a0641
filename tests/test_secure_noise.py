"""Secure Gaussian noise (kernels/secure_noise.py, csrc/secure_noise.cpp): ChaCha20 against the
RFC 8439 test vectors, C++ and NumPy streams identical in test mode, the sum-of-four
construction, and the distribution (mean, variance, KS) on 10^6 draws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpldm.kernels import dispatch
from dpldm.kernels.secure_noise import SecureGaussian, chacha20_block, chacha20_block_np

HAS_CPP = dispatch.cpp_ext() is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="dpldm._C is not built (python setup.py build_ext --inplace)")
BACKENDS = ["numpy"] + (["cpp"] if HAS_CPP else [])

# RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block count 1
RFC_KEY = bytes(range(32))
RFC_NONCE = bytes.fromhex("000000090000004a00000000")
RFC_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
# RFC 8439 section 2.4.2: the "sunscreen" plaintext, counter 1, nonce 00:00:00:00:00:00:00:4a:00:00:00:00
SUNSCREEN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
             b"sunscreen would be it.")
SUNSCREEN_CT_HEAD = bytes.fromhex("6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chacha20_rfc8439_block_vector(backend):
    assert chacha20_block(RFC_KEY, 1, RFC_NONCE, backend=backend) == RFC_BLOCK


@pytest.mark.parametrize("backend", BACKENDS)
def test_chacha20_rfc8439_encryption_vector(backend):
    nonce = bytes.fromhex("000000000000004a00000000")
    ks = chacha20_block(RFC_KEY, 1, nonce, backend=backend) + chacha20_block(RFC_KEY, 2, nonce, backend=backend)
    ct = bytes(p ^ k for p, k in zip(SUNSCREEN, ks))
    assert ct[:32] == SUNSCREEN_CT_HEAD


def test_stream_is_the_rfc_block_function_with_a_64bit_counter():
    """Stream block j = RFC block(counter = j mod 2^32, nonce = LE32(j >> 32) || 0^8)."""
    key = bytes(range(100, 132))
    g = SecureGaussian(seed=key, test_mode=True, backend="numpy")
    ks = g.keystream(3)
    for j in range(3):
        assert ks[64 * j:64 * (j + 1)] == chacha20_block_np(key, j, bytes(12))
    from dpldm.kernels.secure_noise import _stream_words_np
    hi = 2**32 + 5
    words = _stream_words_np(np.frombuffer(key, dtype="<u4"), hi, 1).astype("<u4").tobytes()
    assert words == chacha20_block_np(key, 5, (1).to_bytes(4, "little") + bytes(8))


@needs_cpp
def test_cpp_and_numpy_give_the_same_stream_in_test_mode():
    a = SecureGaussian(seed=1234, test_mode=True, backend="cpp")
    b = SecureGaussian(seed=1234, test_mode=True, backend="numpy")
    assert a.keystream(40) == b.keystream(40)  # bytes: bit for bit
    ca, cb = a.components(5001), b.components(5001)
    # same uniforms; log/sin/cos of two libms may differ in the last ulp
    assert torch.allclose(ca, cb, rtol=1e-13, atol=1e-13)
    za, zb = a.normal((33, 3), std=2.5, dtype=torch.float64), b.normal((33, 3), std=2.5, dtype=torch.float64)
    assert torch.allclose(za, zb, rtol=1e-13, atol=1e-13)
    assert a.blocks_used == b.blocks_used


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_reproducible_only_in_test_mode(backend):
    with pytest.raises(ValueError, match="test_mode=True"):
        SecureGaussian(seed=5, backend=backend)
    x = SecureGaussian(seed=5, test_mode=True, backend=backend).normal(100)
    y = SecureGaussian(seed=5, test_mode=True, backend=backend).normal(100)
    assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="test_mode"):
        SecureGaussian(backend=backend).keystream(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seeds_and_os_keys_give_different_streams(backend):
    a = SecureGaussian(seed=1, test_mode=True, backend=backend).normal(1000, dtype=torch.float64)
    b = SecureGaussian(seed=2, test_mode=True, backend=backend).normal(1000, dtype=torch.float64)
    c = SecureGaussian(backend=backend).normal(1000, dtype=torch.float64)
    d = SecureGaussian(backend=backend).normal(1000, dtype=torch.float64)
    for x, y in ((a, b), (a, c), (c, d)):
        assert not torch.equal(x, y)
        assert abs(float(np.corrcoef(x.numpy(), y.numpy())[0, 1])) < 0.15
    g = SecureGaussian(seed=3, test_mode=True, backend=backend)
    assert not torch.equal(g.normal(1000), g.normal(1000))  # successive calls continue the stream


def test_draws_are_consecutive_and_shape_independent():
    g1 = SecureGaussian(seed=9, test_mode=True)
    g2 = SecureGaussian(seed=9, test_mode=True)
    x = g1.normal((4, 6), dtype=torch.float64)
    y = g2.normal(24, dtype=torch.float64)
    assert torch.equal(x.reshape(-1), y)
    assert g1.normal((0, 3)).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_moments_and_ks_on_a_million_draws(backend):
    n = 10**6
    z = SecureGaussian(seed=2024, test_mode=True, backend=backend).normal(n, dtype=torch.float64).numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se  # var of the sample variance: 2/n
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    assert stats.kstest(z, "norm").pvalue > 1e-3
    zs = SecureGaussian(seed=2025, test_mode=True, backend=backend).normal(n, std=3.0).numpy()
    assert abs(zs.std() / 3.0 - 1) < 5 * se


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_four_construction(backend):
    """normal() returns std * (z1+z2+z3+z4)/2 of the four Box-Muller normals behind it; the four
    are each N(0,1) and uncorrelated, so the sum has variance 1 (each alone would give 1/4 per
    component); the output is not one Box-Muller normal (those are the components)."""
    n = 200_000
    a = SecureGaussian(seed=77, test_mode=True, backend=backend)
    b = SecureGaussian(seed=77, test_mode=True, backend=backend)
    comps = a.components(n).numpy()  # (n, 4)
    out = b.normal(n, std=1.7, dtype=torch.float64).numpy()
    np.testing.assert_allclose(out, 1.7 * ((comps[:, 0] + comps[:, 1]) + (comps[:, 2] + comps[:, 3])) * 0.5,
                               rtol=1e-15, atol=1e-15)
    se = 1 / math.sqrt(n)
    for k in range(4):
        assert abs(comps[:, k].mean()) < 5 * se and abs(comps[:, k].var() - 1) < 5 * math.sqrt(2) * se
        assert stats.kstest(comps[:, k], "norm").pvalue > 1e-3
    corr = np.corrcoef(comps.T)
    assert np.abs(corr - np.eye(4)).max() < 5 * se
    # the statistic of the construction: var(sum/2) = (1/4) * sum of the four variances = 1
    s = comps.sum(1) / 2
    assert abs(s.var() - 1) < 5 * math.sqrt(2) * se
    assert not np.allclose(out / 1.7, comps[:, 0])


def test_output_dtype_device_and_repr_hide_the_key():
    g = SecureGaussian(seed=b"k" * 32, test_mode=True)
    x = g.normal((3, 4), std=0.5, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and x.shape == (3, 4)
    r = repr(g)
    assert "6b6b6b" not in r and "kkkk" not in r
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(g)
    with pytest.raises(ValueError):
        g.normal(3, std=-1.0)
    with pytest.raises(TypeError):
        SecureGaussian(seed=1.5, test_mode=True)


def test_engine_calling_convention():
    """dpldm.privacy.noise calls SecureGaussian(seed=None).normal(shape_tuple, std, dtype)."""
    z = SecureGaussian(seed=None).normal((7, 5), 2.0, torch.float32)
    assert z.shape == (7, 5) and z.dtype == torch.float32 and torch.isfinite(z).all()
