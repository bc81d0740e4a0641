// Secure Gaussian noise for DP-SGD: a ChaCha20 keystream (a CSPRNG) seeded from the OS, mapped
// to Gaussians with a defence against floating-point attacks.
//
// * ChaCha20 block function: Y. Nir, A. Langley, "ChaCha20 and Poly1305 for IETF Protocols",
//   RFC 8439 (2018), section 2.3 (written from the RFC's description; tested against its
//   section 2.3.2 test vector in tests/test_secure_noise.py). The generator uses a 64-bit block
//   counter: state word 12 is its low half (the RFC's counter), word 13 its high half (the
//   first nonce word in the RFC, zero for the first 2^32 blocks), words 14-15 are zero.
// * Seeding: 32 key bytes from getrandom(2) (Linux), else /dev/urandom. A caller-chosen key is
//   accepted only by the Python wrapper's explicit test mode (kernels/secure_noise.py).
// * Gaussian transform: each draw is (z1 + z2 + z3 + z4) / 2 for four independent standard
//   normals from Box-Muller in float64. Mironov (CCS 2012, "On significance of the least
//   significant bits for differential privacy") showed that a textbook floating-point sampler
//   leaks through which doubles it can and cannot output; Holohan & Braghin (ESORICS 2021,
//   "Secure random sampling in differential privacy") showed the same for Gaussian samplers
//   and proposed summing several normals, which Opacus' secure mode does (four normals / 2 in
//   opacus/optimizers/optimizer.py::_generate_noise, backed by torchcsprng). A discrete
//   Gaussian (Canonne, Kamath, Steinke, NeurIPS 2020) is the exact alternative; it is not used
//   here because the DP engine adds noise to float gradients.
// * Uniforms: u = (floor(x / 2^11) + 1/2) * 2^-53 for a 64-bit keystream word x, so u lies in
//   (0, 1) with 53 random bits and log(u) is always finite.
// Layout (the NumPy fallback in kernels/secure_noise.py follows it exactly): draw j of a call
// starting at block b uses block b + j/2; its 64-bit words 4*(j%2) .. 4*(j%2)+3 (word k =
// 32-bit words 2k | 2k+1 << 32) give (u1,u2) -> z1 = r cos(2 pi u2), z2 = r sin(2 pi u2) with
// r = sqrt(-2 ln u1), and (u3,u4) -> z3, z4 the same way.
#include "dpldm_ops.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#if defined(__linux__)
#include <sys/random.h>
#endif

namespace dpldm {
namespace {

inline uint32_t rotl32(uint32_t v, int c) { return (v << c) | (v >> (32 - c)); }

inline void quarter_round(uint32_t* x, int a, int b, int c, int d) {  // RFC 8439 section 2.1
  x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl32(x[d], 16);
  x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl32(x[b], 12);
  x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl32(x[d], 8);
  x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl32(x[b], 7);
}

// RFC 8439 section 2.3: state = constants | key (8 words) | counter | nonce (3 words), 20 rounds
// (10 column + diagonal double rounds), then add the input state word-wise.
void block(const uint32_t key[8], uint32_t w12, uint32_t w13, uint32_t w14, uint32_t w15,
           uint32_t out[16]) {
  uint32_t s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                    key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                    w12, w13, w14, w15};
  uint32_t x[16];
  std::memcpy(x, s, sizeof(x));
  for (int i = 0; i < 10; ++i) {
    quarter_round(x, 0, 4, 8, 12);
    quarter_round(x, 1, 5, 9, 13);
    quarter_round(x, 2, 6, 10, 14);
    quarter_round(x, 3, 7, 11, 15);
    quarter_round(x, 0, 5, 10, 15);
    quarter_round(x, 1, 6, 11, 12);
    quarter_round(x, 2, 7, 8, 13);
    quarter_round(x, 3, 4, 9, 14);
  }
  for (int i = 0; i < 16; ++i) out[i] = x[i] + s[i];
}

inline uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

void key_words(const at::Tensor& key, uint32_t kw[8]) {
  TORCH_CHECK(key.device().is_cpu() && key.scalar_type() == at::kByte && key.dim() == 1 && key.numel() == 32,
              "secure noise: key must be a CPU uint8 tensor of 32 bytes, got ", key.scalar_type(), " ", key.sizes());
  const at::Tensor k = key.contiguous();
  const uint8_t* p = k.data_ptr<uint8_t>();
  for (int i = 0; i < 8; ++i) kw[i] = le32(p + 4 * i);
}

inline void stream_block(const uint32_t kw[8], uint64_t idx, uint32_t out[16]) {
  block(kw, static_cast<uint32_t>(idx), static_cast<uint32_t>(idx >> 32), 0u, 0u, out);
}

inline double uniform53(uint64_t x) {  // (0, 1), 53 bits
  return (static_cast<double>(x >> 11) + 0.5) * 0x1.0p-53;
}

constexpr double kTwoPi = 6.283185307179586476925286766559;

}  // namespace

at::Tensor chacha20_block(const at::Tensor& key, int64_t counter, const at::Tensor& nonce) {
  uint32_t kw[8];
  key_words(key, kw);
  TORCH_CHECK(nonce.device().is_cpu() && nonce.scalar_type() == at::kByte && nonce.numel() == 12,
              "chacha20_block: nonce must be a CPU uint8 tensor of 12 bytes");
  TORCH_CHECK(counter >= 0 && counter <= 0xffffffffLL, "chacha20_block: counter must fit in 32 bits");
  const at::Tensor n = nonce.contiguous();
  const uint8_t* np = n.data_ptr<uint8_t>();
  uint32_t out[16];
  block(kw, static_cast<uint32_t>(counter), le32(np), le32(np + 4), le32(np + 8), out);
  at::Tensor res = at::empty({64}, at::kByte);
  uint8_t* r = res.data_ptr<uint8_t>();
  for (int i = 0; i < 16; ++i)
    for (int b = 0; b < 4; ++b) r[4 * i + b] = static_cast<uint8_t>(out[i] >> (8 * b));
  return res;
}

at::Tensor chacha20_keystream(const at::Tensor& key, int64_t start_block, int64_t n_blocks) {
  uint32_t kw[8];
  key_words(key, kw);
  TORCH_CHECK(start_block >= 0 && n_blocks >= 0, "chacha20_keystream: start_block and n_blocks must be >= 0");
  at::Tensor res = at::empty({n_blocks * 64}, at::kByte);
  uint8_t* r = res.data_ptr<uint8_t>();
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n_blocks; ++j) {
    uint32_t out[16];
    stream_block(kw, static_cast<uint64_t>(start_block + j), out);
    for (int i = 0; i < 16; ++i)
      for (int b = 0; b < 4; ++b) r[64 * j + 4 * i + b] = static_cast<uint8_t>(out[i] >> (8 * b));
  }
  return res;
}

at::Tensor secure_gaussian(const at::Tensor& key, int64_t start_block, int64_t n, double std,
                           bool components) {
  uint32_t kw[8];
  key_words(key, kw);
  TORCH_CHECK(start_block >= 0 && n >= 0, "secure_gaussian: start_block and n must be >= 0");
  TORCH_CHECK(std::isfinite(std) && std >= 0.0, "secure_gaussian: std must be finite and >= 0, got ", std);
  at::Tensor res = components ? at::empty({n, 4}, at::kDouble) : at::empty({n}, at::kDouble);
  double* r = res.data_ptr<double>();
  const int64_t nblocks = (n + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < nblocks; ++j) {
    uint32_t out[16];
    stream_block(kw, static_cast<uint64_t>(start_block + j), out);
    for (int h = 0; h < 2; ++h) {
      const int64_t idx = 2 * j + h;
      if (idx >= n) break;
      double z[4];
      for (int p = 0; p < 2; ++p) {
        const int w = 8 * h + 4 * p;  // 32-bit word offset of this Box-Muller pair
        const uint64_t x1 = uint64_t(out[w]) | (uint64_t(out[w + 1]) << 32);
        const uint64_t x2 = uint64_t(out[w + 2]) | (uint64_t(out[w + 3]) << 32);
        const double rad = std::sqrt(-2.0 * std::log(uniform53(x1)));
        const double th = kTwoPi * uniform53(x2);
        z[2 * p] = rad * std::cos(th);
        z[2 * p + 1] = rad * std::sin(th);
      }
      if (components) {
        for (int c = 0; c < 4; ++c) r[4 * idx + c] = z[c];
      } else {
        r[idx] = std * (((z[0] + z[1]) + (z[2] + z[3])) * 0.5);
      }
    }
  }
  return res;
}

at::Tensor os_random_bytes(int64_t n) {
  TORCH_CHECK(n >= 0, "os_random_bytes: n must be >= 0");
  at::Tensor res = at::empty({n}, at::kByte);
  uint8_t* p = res.data_ptr<uint8_t>();
  int64_t got = 0;
#if defined(__linux__)
  while (got < n) {
    const ssize_t k = getrandom(p + got, static_cast<size_t>(n - got), 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      break;  // e.g. ENOSYS on an old kernel: fall back to /dev/urandom
    }
    got += k;
  }
#endif
  if (got < n) {
    FILE* f = std::fopen("/dev/urandom", "rb");
    TORCH_CHECK(f != nullptr, "os_random_bytes: neither getrandom(2) nor /dev/urandom is available");
    const size_t k = std::fread(p + got, 1, static_cast<size_t>(n - got), f);
    std::fclose(f);
    TORCH_CHECK(static_cast<int64_t>(k) == n - got, "os_random_bytes: short read from /dev/urandom");
  }
  return res;
}

}  // namespace dpldm
