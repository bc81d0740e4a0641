// CUDA versions of the per-example Linear norm ops of csrc/linear_ops.cpp (references: the
// `*_torch` functions of kernels/linear.py). Built into dpldm._cuda only where torch has CUDA
// (setup.py; DPLDM_SKIP_CUDA_BUILD=1 skips it). The Triton kernels (kernels/linear_triton.py)
// are the main GPU path; these plain shared-memory FMA kernels are the fallback and cross-check.
//
// A (B,T,d_in), G (B,T,d_out) contiguous, mask (B,T) fp32 or empty, coef (B,) fp32.
// All accumulation is fp32; a 32 x 32 output tile per block of 32 x 8 threads (4 rows each).
//   fused : grid (tiles of d_out x d_in, B). Tile of G_i^T A_i accumulated over T in registers,
//           squared and block-reduced to one partial per (example, tile). Never writes B*d_out*d_in.
//   ghost : grid (tile pairs s <= r of T x T, B). A_s A_r^T and G_s G_r^T tiles reduced over d in
//           registers; partial = w * sum(ga * gg * m_s m_r) (+ bias term), w = 2 off-diagonal.
//   sum   : grid (d_in tiles, d_out tiles, split of the B*T rows). GEMM with the row scale
//           coef_i * mask_it applied while staging G in shared memory; per-split partials.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

namespace dpldm_cuda {

constexpr int TILE = 32;  // output tile edge and staged reduction chunk
constexpr int TY = 8;     // thread rows; each thread owns TILE / TY = 4 output rows
constexpr int RPT = TILE / TY;

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<at::Half>(at::Half v) { return __half2float(static_cast<__half>(v)); }
template <> __device__ __forceinline__ float to_f<at::BFloat16>(at::BFloat16 v) {
  return __bfloat162float(static_cast<__nv_bfloat16>(v));
}

__device__ __forceinline__ float block_sum(float v, float* red) {  // red: TY*TILE/32 floats
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = (threadIdx.y * blockDim.x + threadIdx.x) / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0 && threadIdx.y == 0)
    for (int w = 0; w < (TILE * TY) / 32; ++w) s += red[w];
  return s;  // valid in thread (0,0)
}

template <typename scalar_t>
__global__ void fused_sqnorm_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                                    const float* __restrict__ M, float* __restrict__ part, int T, int d_in,
                                    int d_out, int n_ti, int n_tiles, bool bias) {
  __shared__ float Gs[TILE][TILE + 1];  // [t][o]
  __shared__ float As[TILE][TILE + 1];  // [t][i]
  __shared__ float red[TILE * TY / 32];
  const int b = blockIdx.y, tile = blockIdx.x;
  const int o0 = (tile / n_ti) * TILE, i0 = (tile % n_ti) * TILE;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const scalar_t* Ab = A + (int64_t)b * T * d_in;
  const scalar_t* Gb = G + (int64_t)b * T * d_out;
  float acc[RPT] = {0.f, 0.f, 0.f, 0.f};
  float bacc = 0.f;
  for (int t0 = 0; t0 < T; t0 += TILE) {
    for (int r = ty; r < TILE; r += TY) {
      const int t = t0 + r;
      const float mv = (t < T) ? (M ? M[(int64_t)b * T + t] : 1.f) : 0.f;
      Gs[r][tx] = (t < T && o0 + tx < d_out) ? mv * to_f(Gb[(int64_t)t * d_out + o0 + tx]) : 0.f;
      As[r][tx] = (t < T && i0 + tx < d_in) ? to_f(Ab[(int64_t)t * d_in + i0 + tx]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < TILE; ++k) {
      const float a = As[k][tx];
#pragma unroll
      for (int j = 0; j < RPT; ++j) acc[j] += Gs[k][ty + j * TY] * a;  // row o = ty + j*TY, col i = tx
    }
    if (bias && i0 == 0 && ty == 0)
      for (int k = 0; k < TILE; ++k) bacc += Gs[k][tx];
    __syncthreads();
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < RPT; ++j) s += acc[j] * acc[j];
  s += bacc * bacc;  // nonzero only in row ty == 0 of the i0 == 0 tiles
  s = block_sum(s, red);
  if (tx == 0 && ty == 0) part[(int64_t)b * n_tiles + tile] = s;
}

// acc[j] += <X[s0 + ty + j*TY, :], X[r0 + tx, :]> over the d columns, staged through shared memory.
template <typename scalar_t>
__device__ __forceinline__ void gram_tile(const scalar_t* __restrict__ X, int d, int T, int s0, int r0,
                                          float (&acc)[RPT], float (*Ss)[TILE + 1], float (*Rs)[TILE + 1]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int k0 = 0; k0 < d; k0 += TILE) {
    for (int r = ty; r < TILE; r += TY) {
      const int k = k0 + tx;
      Ss[r][tx] = (s0 + r < T && k < d) ? to_f(X[(int64_t)(s0 + r) * d + k]) : 0.f;
      Rs[r][tx] = (r0 + r < T && k < d) ? to_f(X[(int64_t)(r0 + r) * d + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < TILE; ++k) {
      const float rv = Rs[tx][k];  // column r = tx
#pragma unroll
      for (int j = 0; j < RPT; ++j) acc[j] += Ss[ty + j * TY][k] * rv;  // row s = ty + j*TY
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void ghost_sqnorm_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                                    const float* __restrict__ M, const int* __restrict__ pairs,
                                    float* __restrict__ part, int T, int d_in, int d_out, int n_pairs, bool bias) {
  __shared__ float Ss[TILE][TILE + 1];  // [row s][d]
  __shared__ float Rs[TILE][TILE + 1];  // [row r][d]
  __shared__ float red[TILE * TY / 32];
  const int b = blockIdx.y, p = blockIdx.x;
  const int s0 = pairs[2 * p] * TILE, r0 = pairs[2 * p + 1] * TILE;
  const int tx = threadIdx.x, ty = threadIdx.y;
  float ga[RPT] = {0.f, 0.f, 0.f, 0.f}, gg[RPT] = {0.f, 0.f, 0.f, 0.f};
  gram_tile(A + (int64_t)b * T * d_in, d_in, T, s0, r0, ga, Ss, Rs);   // A_s A_r^T
  gram_tile(G + (int64_t)b * T * d_out, d_out, T, s0, r0, gg, Ss, Rs);  // G_s G_r^T
  const float w = (s0 == r0) ? 1.f : 2.f;
  float v = 0.f;
  const float mr = (r0 + tx < T) ? (M ? M[(int64_t)b * T + r0 + tx] : 1.f) : 0.f;
#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    const int srow = s0 + ty + j * TY;
    const float ms = (srow < T) ? (M ? M[(int64_t)b * T + srow] : 1.f) : 0.f;
    const float g = gg[j] * ms * mr;
    v += ga[j] * g + (bias ? g : 0.f);
  }
  v = block_sum(v, red);
  if (tx == 0 && ty == 0) part[(int64_t)b * n_pairs + p] = w * v;
}

template <typename scalar_t>
__global__ void clipped_sum_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                                   const float* __restrict__ coef, const float* __restrict__ M,
                                   float* __restrict__ wpart, float* __restrict__ bpart, int T, int64_t rows,
                                   int d_in, int d_out, int64_t rows_per_split, bool bias) {
  __shared__ float Gs[TILE][TILE + 1];  // [row][o], scaled
  __shared__ float As[TILE][TILE + 1];  // [row][i]
  const int i0 = blockIdx.x * TILE, o0 = blockIdx.y * TILE, sp = blockIdx.z;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k_begin = (int64_t)sp * rows_per_split;
  const int64_t k_end = min(rows, k_begin + rows_per_split);
  float acc[RPT] = {0.f, 0.f, 0.f, 0.f};
  float bacc = 0.f;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += TILE) {
    for (int r = ty; r < TILE; r += TY) {
      const int64_t l = k0 + r;
      float sc = 0.f;
      if (l < k_end) sc = coef[l / T] * (M ? M[l] : 1.f);
      Gs[r][tx] = (l < k_end && o0 + tx < d_out) ? sc * to_f(G[l * d_out + o0 + tx]) : 0.f;
      As[r][tx] = (l < k_end && i0 + tx < d_in) ? to_f(A[l * d_in + i0 + tx]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < TILE; ++k) {
      const float a = As[k][tx];
#pragma unroll
      for (int j = 0; j < RPT; ++j) acc[j] += Gs[k][ty + j * TY] * a;
    }
    if (bias && i0 == 0 && ty == 0)
      for (int k = 0; k < TILE; ++k) bacc += Gs[k][tx];
    __syncthreads();
  }
  float* W = wpart + (int64_t)sp * d_out * d_in;
#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    const int o = o0 + ty + j * TY, i = i0 + tx;
    if (o < d_out && i < d_in) W[(int64_t)o * d_in + i] = acc[j];
  }
  if (bias && i0 == 0 && ty == 0 && o0 + tx < d_out) bpart[(int64_t)sp * d_out + o0 + tx] = bacc;
}

// ---- launchers -----------------------------------------------------------------------------------
namespace {
const float* mask_ptr(const c10::optional<at::Tensor>& m) { return m ? m->data_ptr<float>() : nullptr; }
int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
}  // namespace

at::Tensor sqnorm_fused_cuda(const at::Tensor& A, const at::Tensor& G, const c10::optional<at::Tensor>& M, bool bias) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2);
  const int n_ti = cdiv(d_in, TILE), n_to = cdiv(d_out, TILE), n_tiles = n_ti * n_to;
  at::Tensor part = at::zeros({B, n_tiles}, A.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || n_tiles == 0) return part.sum(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "sqnorm_fused_cuda", [&] {
    fused_sqnorm_kernel<scalar_t><<<dim3(n_tiles, B), dim3(TILE, TY), 0, stream>>>(
        A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), mask_ptr(M), part.data_ptr<float>(), (int)T, (int)d_in,
        (int)d_out, n_ti, n_tiles, bias);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part.sum(1);
}

at::Tensor sqnorm_ghost_cuda(const at::Tensor& A, const at::Tensor& G, const c10::optional<at::Tensor>& M, bool bias) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2);
  const int nt = cdiv(T, TILE);
  std::vector<int> hp;
  for (int r = 0; r < nt; ++r)
    for (int s = 0; s <= r; ++s) { hp.push_back(s); hp.push_back(r); }
  const int n_pairs = nt * (nt + 1) / 2;
  at::Tensor part = at::zeros({B, n_pairs}, A.options().dtype(at::kFloat));
  if (B == 0 || T == 0) return part.sum(1);
  at::Tensor pairs = at::from_blob(hp.data(), {(int64_t)hp.size()}, at::kInt).to(A.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "sqnorm_ghost_cuda", [&] {
    ghost_sqnorm_kernel<scalar_t><<<dim3(n_pairs, B), dim3(TILE, TY), 0, stream>>>(
        A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), mask_ptr(M), pairs.data_ptr<int>(), part.data_ptr<float>(),
        (int)T, (int)d_in, (int)d_out, n_pairs, bias);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part.sum(1);
}

std::vector<at::Tensor> clipped_sum_cuda(const at::Tensor& A, const at::Tensor& G, const at::Tensor& coef,
                                         const c10::optional<at::Tensor>& M, bool bias) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2), rows = B * T;
  const int n_i = cdiv(d_in, TILE), n_o = cdiv(d_out, TILE);
  const int64_t n_k = (rows + TILE - 1) / TILE;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, A.get_device()));
  int64_t split = std::max<int64_t>(1, std::min<int64_t>(n_k, (4 * sms) / std::max(1, n_i * n_o)));
  const int64_t rows_per_split = ((n_k + split - 1) / split) * TILE;
  split = rows == 0 ? 1 : (rows + rows_per_split - 1) / rows_per_split;
  at::Tensor wpart = at::zeros({split, d_out, d_in}, A.options().dtype(at::kFloat));
  at::Tensor bpart = at::zeros({split, d_out}, A.options().dtype(at::kFloat));
  if (rows > 0 && d_in > 0 && d_out > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "clipped_sum_cuda", [&] {
      clipped_sum_kernel<scalar_t><<<dim3(n_i, n_o, split), dim3(TILE, TY), 0, stream>>>(
          A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), coef.data_ptr<float>(), mask_ptr(M),
          wpart.data_ptr<float>(), bpart.data_ptr<float>(), (int)T, rows, (int)d_in, (int)d_out, rows_per_split, bias);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {wpart.sum(0), bpart.sum(0)};
}

}  // namespace dpldm_cuda
