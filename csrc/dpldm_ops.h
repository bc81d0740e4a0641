// dpldm._C: CPU (OpenMP) per-example gradient-norm / clipped-sum ops and a secure Gaussian
// noise generator. Declarations shared by the op files and the thin pybind11 layer
// (bindings.cpp), in the style of flash-attention: the binding only checks inputs and
// forwards to these functions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace dpldm {

// ---- Linear layers: A (B,T,d_in), G (B,T,d_out), mask (B,T) or none ----------------------
// (B,) fp32/fp64 squared Frobenius norms of G_i^T A_i (+ ||sum_t G_it||^2 if bias), computed
// tile by tile (d_out x d_in panels, reduced over T), never writing the (B,d_out,d_in) stack.
at::Tensor sqnorm_linear_fused(const at::Tensor& A, const at::Tensor& G,
                               const std::optional<at::Tensor>& mask, bool bias);
// Same norms by the ghost identity <A_i A_i^T, G_i G_i^T> on T x T tiles (never B*T*T).
at::Tensor sqnorm_linear_ghost(const at::Tensor& A, const at::Tensor& G,
                               const std::optional<at::Tensor>& mask, bool bias);
// sum_i coef_i G_i^T A_i (d_out, d_in) and sum_i coef_i sum_t G_it (d_out) if bias; the
// coef (x mask) scaling is applied while packing the GEMM panels.
std::vector<at::Tensor> clipped_sum_linear(const at::Tensor& A, const at::Tensor& G,
                                           const at::Tensor& coef,
                                           const std::optional<at::Tensor>& mask, bool bias);

// ---- LayerNorm / GroupNorm affine: xhat, G (B,N,C) -> (B,C) weight and bias grads --------
std::vector<at::Tensor> norm_affine_grads(const at::Tensor& xhat, const at::Tensor& G);

// Extra bytes the fused / ghost norms allocate besides their (B,) output, for the benchmark's
// O(B + tile) claim: threads x (panel + packed tile) buffers.
int64_t fused_workspace_bytes(int64_t T, int64_t d_in, int64_t d_out, int64_t elem_bytes);
int64_t ghost_workspace_bytes(int64_t T, int64_t d_in, int64_t d_out, int64_t elem_bytes);
int64_t clipped_sum_workspace_bytes(int64_t d_in, int64_t d_out, int64_t elem_bytes);

// ---- Secure noise (secure_noise.cpp) --------------------------------------------------------
// RFC 8439 section 2.3 ChaCha20 block function: 32-byte key, 32-bit counter, 12-byte nonce.
at::Tensor chacha20_block(const at::Tensor& key, int64_t counter, const at::Tensor& nonce);
// Keystream blocks [start_block, start_block + n_blocks) of the 64-bit-counter stream
// (counter low word in state word 12, high word in word 13), uint8 (n_blocks*64,).
at::Tensor chacha20_keystream(const at::Tensor& key, int64_t start_block, int64_t n_blocks);
// n Gaussian draws (float64), each the sum of four Box-Muller normals / 2, from the
// keystream starting at block start_block (two draws per block). Returns (n,) or, with
// components=true, the (n, 4) component normals (for tests of the construction).
at::Tensor secure_gaussian(const at::Tensor& key, int64_t start_block, int64_t n, double std,
                           bool components);
// n bytes from the OS CSPRNG (getrandom(2), else /dev/urandom), uint8 (n,).
at::Tensor os_random_bytes(int64_t n);

}  // namespace dpldm
