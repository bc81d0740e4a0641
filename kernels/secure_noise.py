"""Secure Gaussian noise for DP-SGD: ChaCha20 (RFC 8439) keystream seeded from the OS, with the
sum-of-four-Gaussians defence against floating-point attacks.

    SecureGaussian(seed=None, test_mode=False).normal(shape, std=1.0, dtype=torch.float32)

* Generator: ChaCha20 block function (Nir & Langley, RFC 8439, section 2.3) in counter mode
  with a 64-bit block counter (state word 12 = low half, word 13 = high half, words 14-15 = 0),
  keyed by 32 bytes from the OS CSPRNG (getrandom(2) via the C++ op, else os.urandom).
* Gaussian transform: every draw is (z1 + z2 + z3 + z4) / 2 of four standard normals from
  Box-Muller in float64 (each from two 53-bit uniforms in (0, 1)). Mironov (CCS 2012, "On
  significance of the least significant bits for differential privacy") showed that textbook
  floating-point samplers leak through the set of doubles they can output; Holohan & Braghin
  (ESORICS 2021, "Secure random sampling in differential privacy") showed it for Gaussians and
  proposed summing several draws, which Opacus' secure mode does (four normals / 2, in
  `opacus/optimizers/optimizer.py::_generate_noise`, with torchcsprng as its generator, a
  package that no longer builds). An exact discrete Gaussian (Canonne, Kamath & Steinke,
  NeurIPS 2020) would close the gap fully; the engine adds noise to float gradients, so the
  sum-of-four is used here. The draw is rounded to `dtype` only at the end.
* Implementations: the C++ op `dpldm._C.secure_gaussian` (csrc/secure_noise.cpp, OpenMP) when
  the extension is built, else the NumPy-vectorised ChaCha20 below. Both follow one layout and
  give the same keystream and uniforms bit for bit; the Gaussians agree to float64 rounding of
  the libm functions (tests/test_secure_noise.py).
  Layout: draw j of a call starting at block b uses block b + j // 2; its 64-bit words
  4*(j%2) .. 4*(j%2)+3 (64-bit word k = 32-bit words 2k | 2k+1 << 32) give uniforms
  u = (floor(x / 2^11) + 1/2) * 2^-53 -> (u1,u2), (u3,u4) -> z1 = r cos(2 pi u2),
  z2 = r sin(2 pi u2), r = sqrt(-2 ln u1), and z3, z4 likewise. Each call starts on a fresh block.
* A fixed seed (int or bytes) is accepted only with test_mode=True (reproducible streams for
  tests); secure runs take the key from the OS and never store or print it.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np
import torch

from .dispatch import cpp_ext

_CONST = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)  # "expand 32-byte k"
_CHUNK_BLOCKS = 1 << 15  # NumPy path: blocks per vectorised chunk (bounds its memory to ~10 MB)
_SEED_DOMAIN = b"dpldm.SecureGaussian.v1\x00"


# ---- NumPy ChaCha20 (RFC 8439 section 2.3), vectorised over blocks -------------------------------
def _rotl(x: np.ndarray, c: int) -> np.ndarray:
    return (x << np.uint32(c)) | (x >> np.uint32(32 - c))


def _quarter(x: np.ndarray, a: int, b: int, c: int, d: int) -> None:  # RFC 8439 section 2.1
    x[a] += x[b]; x[d] ^= x[a]; x[d] = _rotl(x[d], 16)  # noqa: E702
    x[c] += x[d]; x[b] ^= x[c]; x[b] = _rotl(x[b], 12)  # noqa: E702
    x[a] += x[b]; x[d] ^= x[a]; x[d] = _rotl(x[d], 8)  # noqa: E702
    x[c] += x[d]; x[b] ^= x[c]; x[b] = _rotl(x[b], 7)  # noqa: E702


def _chacha_rounds(state: np.ndarray) -> np.ndarray:
    """state (16, n) uint32 -> (n, 16) output words (20 rounds, then add the input state)."""
    x = state.copy()
    for _ in range(10):
        _quarter(x, 0, 4, 8, 12); _quarter(x, 1, 5, 9, 13); _quarter(x, 2, 6, 10, 14); _quarter(x, 3, 7, 11, 15)  # noqa: E702
        _quarter(x, 0, 5, 10, 15); _quarter(x, 1, 6, 11, 12); _quarter(x, 2, 7, 8, 13); _quarter(x, 3, 4, 9, 14)  # noqa: E702
    return (x + state).T


def chacha20_block_np(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 section 2.3 block function: 32-byte key, 32-bit counter, 12-byte nonce -> 64 bytes."""
    if len(key) != 32 or len(nonce) != 12 or not (0 <= counter < 2**32):
        raise ValueError("chacha20_block_np: need a 32-byte key, a 12-byte nonce and a 32-bit counter")
    st = np.empty((16, 1), dtype=np.uint32)
    st[0:4, 0] = _CONST
    st[4:12, 0] = np.frombuffer(key, dtype="<u4")
    st[12, 0] = counter
    st[13:16, 0] = np.frombuffer(nonce, dtype="<u4")
    return _chacha_rounds(st).astype("<u4").tobytes()


def _stream_words_np(key_words: np.ndarray, start: int, n: int) -> np.ndarray:
    """(n, 16) uint32 output words of stream blocks start .. start+n-1 (64-bit counter)."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    st = np.empty((16, n), dtype=np.uint32)
    st[0:4] = _CONST[:, None]
    st[4:12] = key_words[:, None]
    st[12] = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    st[13] = (idx >> np.uint64(32)).astype(np.uint32)
    st[14] = 0
    st[15] = 0
    return _chacha_rounds(st)


def _uniform53(x: np.ndarray) -> np.ndarray:
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _components_np(key_words: np.ndarray, start: int, n: int) -> np.ndarray:
    """(n, 4) float64 Box-Muller normals of draws 0..n-1 starting at block `start`."""
    out = np.empty((n, 4), dtype=np.float64)
    nblocks = (n + 1) // 2
    for c0 in range(0, nblocks, _CHUNK_BLOCKS):
        nb = min(_CHUNK_BLOCKS, nblocks - c0)
        w = _stream_words_np(key_words, start + c0, nb).astype(np.uint64)  # (nb, 16)
        x = (w[:, 0::2] | (w[:, 1::2] << np.uint64(32))).reshape(2 * nb, 4)  # (2nb, 4) 64-bit words per draw
        u = _uniform53(x)
        r1 = np.sqrt(-2.0 * np.log(u[:, 0]))
        r2 = np.sqrt(-2.0 * np.log(u[:, 2]))
        t1 = (2.0 * math.pi) * u[:, 1]
        t2 = (2.0 * math.pi) * u[:, 3]
        z = np.stack([r1 * np.cos(t1), r1 * np.sin(t1), r2 * np.cos(t2), r2 * np.sin(t2)], axis=1)
        lo = 2 * c0
        hi = min(n, lo + 2 * nb)
        out[lo:hi] = z[: hi - lo]
    return out


def _key_from_seed(seed: int | bytes) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (int, bytes, bytearray)):
        raise TypeError(f"seed must be an int, bytes or None, got {type(seed).__name__}")
    if isinstance(seed, (bytes, bytearray)):
        return bytes(seed) if len(seed) == 32 else hashlib.sha256(_SEED_DOMAIN + bytes(seed)).digest()
    return hashlib.sha256(_SEED_DOMAIN + str(int(seed)).encode()).digest()


def os_key() -> bytes:
    """32 key bytes from the OS CSPRNG: getrandom(2) through dpldm._C when built, else os.urandom."""
    ext = cpp_ext()
    if ext is not None:
        return bytes(ext.os_random_bytes(32).tolist())
    return os.urandom(32)


class SecureGaussian:
    """CSPRNG Gaussian sampler (see the module docstring for the construction and citations).

    seed: None (key from the OS; the only choice outside tests), or an int/bytes key seed, which
    requires test_mode=True. backend: "auto" (the C++ op when built, else NumPy), "cpp", "numpy".
    """

    BACKENDS = ("auto", "cpp", "numpy")
    _warned_numpy = False

    def __init__(self, seed: int | bytes | None = None, test_mode: bool = False, backend: str = "auto") -> None:
        if seed is not None and not test_mode:
            raise ValueError("SecureGaussian: a fixed seed makes the noise predictable to anyone who knows it; "
                             "it is accepted only with test_mode=True (secure runs use seed=None, an OS key)")
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        ext = cpp_ext()
        if backend == "cpp" and ext is None:
            raise RuntimeError("SecureGaussian backend 'cpp' needs the C++ extension dpldm._C, which is not built "
                               "(python setup.py build_ext --inplace)")
        self.backend = "cpp" if (backend == "cpp" or (backend == "auto" and ext is not None)) else "numpy"
        if backend == "auto" and self.backend == "numpy" and not SecureGaussian._warned_numpy:
            SecureGaussian._warned_numpy = True
            warnings.warn("dpldm._C is not built: SecureGaussian uses the (slower) NumPy ChaCha20", RuntimeWarning,
                          stacklevel=2)
        self.test_mode = bool(test_mode)
        key = os_key() if seed is None else _key_from_seed(seed)
        self._key_words = np.frombuffer(key, dtype="<u4").copy()
        self._key_tensor = torch.frombuffer(bytearray(key), dtype=torch.uint8).clone()
        self.blocks_used = 0  # next unused keystream block

    def __repr__(self) -> str:  # never shows the key
        return f"SecureGaussian(backend={self.backend!r}, test_mode={self.test_mode}, blocks_used={self.blocks_used})"

    def __getstate__(self):
        raise TypeError("SecureGaussian holds a secret key and is not picklable; create a new one on resume")

    def _take(self, nblocks: int) -> int:
        start = self.blocks_used
        if start + nblocks >= 2**64:
            raise OverflowError("SecureGaussian: keystream exhausted (2^64 blocks); create a new generator")
        self.blocks_used = start + nblocks
        return start

    def components(self, n: int) -> torch.Tensor:
        """(n, 4) float64: the four Box-Muller normals behind the next n draws (for testing the
        construction: normal() would have returned std * row.sum() / 2). Consumes the stream."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        start = self._take((n + 1) // 2)
        if self.backend == "cpp":
            return cpp_ext().secure_gaussian(self._key_tensor, start, n, 1.0, True)
        return torch.from_numpy(_components_np(self._key_words, start, n))

    def normal(self, shape, std: float = 1.0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """N(0, std^2) draws of the given shape, computed in float64 and rounded to `dtype` once."""
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must be non-negative, got {shape}")
        std = float(std)
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {dtype}")
        n = math.prod(shape)
        start = self._take((n + 1) // 2)
        if self.backend == "cpp":
            z = cpp_ext().secure_gaussian(self._key_tensor, start, n, std, False)
        else:
            c = _components_np(self._key_words, start, n)
            z = torch.from_numpy(std * (((c[:, 0] + c[:, 1]) + (c[:, 2] + c[:, 3])) * 0.5))
        return z.reshape(shape).to(dtype=dtype, device=device)

    def keystream(self, n_blocks: int) -> bytes:
        """Raw keystream bytes (test mode only: the raw stream of a secure run must not leak)."""
        if not self.test_mode:
            raise RuntimeError("SecureGaussian.keystream is available only in test_mode")
        start = self._take(int(n_blocks))
        if self.backend == "cpp":
            return bytes(cpp_ext().chacha20_keystream(self._key_tensor, start, int(n_blocks)).numpy().tobytes())
        return _stream_words_np(self._key_words, start, int(n_blocks)).astype("<u4").tobytes()


def chacha20_block(key: bytes, counter: int, nonce: bytes, backend: str = "auto") -> bytes:
    """RFC 8439 section 2.3 block function through the C++ op (when built) or NumPy."""
    ext = cpp_ext()
    if backend == "numpy" or (backend == "auto" and ext is None):
        return chacha20_block_np(key, counter, nonce)
    if ext is None:
        raise RuntimeError("backend 'cpp' needs the C++ extension dpldm._C, which is not built")
    k = torch.frombuffer(bytearray(key), dtype=torch.uint8)
    nn = torch.frombuffer(bytearray(nonce), dtype=torch.uint8)
    return bytes(ext.chacha20_block(k, int(counter), nn).numpy().tobytes())


__all__ = ["SecureGaussian", "chacha20_block", "chacha20_block_np", "os_key"]
