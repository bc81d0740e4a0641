// CPU (OpenMP) per-example gradient norms and clipped sums for Linear and norm-affine layers.
//
// Shapes: A (B,T,d_in) layer inputs, G (B,T,d_out) output gradients, mask (B,T), coef (B,).
// The per-example weight gradient is G_i^T A_i (d_out, d_in). Nothing here writes the
// (B, d_out, d_in) stack of per-example gradients:
//   fused norm  : for each example and each (d_out x 64) panel of G_i^T A_i, accumulate the
//                 panel over T in a per-thread buffer, add its squared sum, reuse the buffer.
//                 Extra memory: (B,) output + threads x (d_out*64 + 256*64) floats.
//   ghost norm  : ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>, on 64 x 64 tiles of the two T x T
//                 Gram matrices (upper triangle, off-diagonal tiles counted twice).
//                 Extra memory: (B,) output + threads x (2*64*64 + 256*64) floats.
//   clipped sum : sum_i coef_i G_i^T A_i as one GEMM over the B*T rows; the coef_i * mask_it
//                 row scale is applied while packing the GEMM's right panel (fused scaling).
// The reference for every op is the plain-PyTorch code in kernels/linear.py and
// kernels/norms.py; tests/test_kernels_cpp.py compares them.
//
// fp16/bf16 inputs are converted to fp32 on load and accumulated in fp32; fp64 in fp64.
// Sums over tiles are taken in a fixed order, so results do not depend on the thread count.
#include "dpldm_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dpldm {
namespace {

constexpr int MR = 6;         // rows of the register micro-tile (broadcast operand X)
constexpr int NR = 16;        // columns of the register micro-tile (packed operand Y)
constexpr int64_t NB = 64;    // width of a packed Y panel (multiple of NR)
constexpr int64_t KC = 256;   // reduction rows packed at once
constexpr int64_t TB = 64;    // ghost: rows of a T x T Gram tile
constexpr int64_t MB_SUM = 128;  // clipped sum: output rows per work item

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };

// ---- micro-kernel: C[m][n] += sum_{l<kc} X(l,m) * P[l][n], m < MR_, n < NR -------------------
// X(l,m) = X[l*xl + m*xm] (any strides, broadcast), P packed (kc x ldp), C row stride ldc.
// The MR_ x NR accumulators live in vector registers for the whole reduction over l.
// Native-width GCC vector types: BYTES = 64 (AVX-512), 32 (AVX2), 16 (SSE2 / NEON).
template <typename T, int BYTES> struct Vec { typedef T type __attribute__((vector_size(BYTES))); };

template <typename scalar_t, typename acc_t, int BYTES, int MR_>
static inline __attribute__((always_inline)) void micro_body(
    const scalar_t* __restrict X, int64_t xl, int64_t xm, const acc_t* __restrict P, int64_t ldp,
    int64_t kc, acc_t* __restrict C, int64_t ldc) {
  using V = typename Vec<acc_t, BYTES>::type;
  constexpr int W = BYTES / sizeof(acc_t);  // lanes per vector
  constexpr int NV = NR / W;                // vectors per micro-tile row
  static_assert(NV * W == NR, "NR must be a multiple of the vector width");
  V acc[MR_][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR_; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[m][v], C + m * ldc + v * W, sizeof(V));
  for (int64_t l = 0; l < kc; ++l) {
    V p[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&p[v], P + l * ldp + v * W, sizeof(V));
    const scalar_t* x = X + l * xl;
#pragma GCC unroll 8
    for (int m = 0; m < MR_; ++m) {
      const acc_t xv = static_cast<acc_t>(x[m * xm]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] += xv * p[v];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR_; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(C + m * ldc + v * W, &acc[m][v], sizeof(V));
}

#define DPLDM_MICRO_SWITCH(BYTES)                                                        \
  switch (mr) {                                                                          \
    case 6: micro_body<scalar_t, acc_t, BYTES, 6>(X, xl, xm, P, ldp, kc, C, ldc); break; \
    case 5: micro_body<scalar_t, acc_t, BYTES, 5>(X, xl, xm, P, ldp, kc, C, ldc); break; \
    case 4: micro_body<scalar_t, acc_t, BYTES, 4>(X, xl, xm, P, ldp, kc, C, ldc); break; \
    case 3: micro_body<scalar_t, acc_t, BYTES, 3>(X, xl, xm, P, ldp, kc, C, ldc); break; \
    case 2: micro_body<scalar_t, acc_t, BYTES, 2>(X, xl, xm, P, ldp, kc, C, ldc); break; \
    default: micro_body<scalar_t, acc_t, BYTES, 1>(X, xl, xm, P, ldp, kc, C, ldc); break; \
  }

template <typename scalar_t, typename acc_t>
using MicroFn = void (*)(int, const scalar_t*, int64_t, int64_t, const acc_t*, int64_t, int64_t,
                         acc_t*, int64_t);

template <typename scalar_t, typename acc_t>
void micro_generic(int mr, const scalar_t* X, int64_t xl, int64_t xm, const acc_t* P, int64_t ldp,
                   int64_t kc, acc_t* C, int64_t ldc) {
  DPLDM_MICRO_SWITCH(16)
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same body compiled for wider vector units; chosen once at run time (portable binary).
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void micro_avx2(int mr, const scalar_t* X, int64_t xl,
                                                     int64_t xm, const acc_t* P, int64_t ldp,
                                                     int64_t kc, acc_t* C, int64_t ldc) {
  DPLDM_MICRO_SWITCH(32)
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) void micro_avx512(
    int mr, const scalar_t* X, int64_t xl, int64_t xm, const acc_t* P, int64_t ldp, int64_t kc,
    acc_t* C, int64_t ldc) {
  DPLDM_MICRO_SWITCH(64)
}
#endif

template <typename scalar_t, typename acc_t>
MicroFn<scalar_t, acc_t> pick_micro() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return micro_avx512<scalar_t, acc_t>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return micro_avx2<scalar_t, acc_t>;
#endif
  return micro_generic<scalar_t, acc_t>;
}

// ---- panel: C (M x NB, row stride ldc) = sum_{l<L} scale(l) X(l,m) Y(l,n), n < N <= NB -------
// Y(l,n) = Y[l*yl + n*yn]; it is packed KC rows at a time into `pack` (KC x npad, zero padded),
// multiplied by scale(l) on the way (the fused row scaling). C must have npad >= N columns.
template <typename scalar_t, typename acc_t, typename ScaleF>
void panel_xty(MicroFn<scalar_t, acc_t> micro, const scalar_t* X, int64_t xl, int64_t xm,
               int64_t M, const scalar_t* Y, int64_t yl, int64_t yn, int64_t N, int64_t L,
               ScaleF scale, acc_t* C, int64_t ldc, acc_t* pack) {
  const int64_t npad = (N + NR - 1) / NR * NR;
  for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + npad, acc_t(0));
  for (int64_t l0 = 0; l0 < L; l0 += KC) {
    const int64_t kc = std::min(KC, L - l0);
    for (int64_t l = 0; l < kc; ++l) {
      const acc_t s = scale(l0 + l);
      const scalar_t* y = Y + (l0 + l) * yl;
      acc_t* p = pack + l * npad;
      for (int64_t n = 0; n < N; ++n) p[n] = s * static_cast<acc_t>(y[n * yn]);
      for (int64_t n = N; n < npad; ++n) p[n] = acc_t(0);
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
      for (int64_t n0 = 0; n0 < npad; n0 += NR)
        micro(mr, X + l0 * xl + m0 * xm, xl, xm, pack + n0, npad, kc, C + m0 * ldc + n0, ldc);
    }
  }
}

// AT_DISPATCH_* takes the body as a macro argument, where #pragma omp is not allowed; this
// switch calls a generic lambda with a value of the element type instead.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}


// ---- fused norm of one example -----------------------------------------------------------------
template <typename scalar_t, typename acc_t>
double fused_panel_sqsum(MicroFn<scalar_t, acc_t> micro, const scalar_t* Ai, const scalar_t* Gi,
                         const acc_t* mi, int64_t T, int64_t d_in, int64_t d_out, int64_t kb,
                         acc_t* C, acc_t* pack) {
  const int64_t N = std::min(NB, d_in - kb);
  auto scale = [mi](int64_t t) { return mi ? mi[t] : acc_t(1); };
  // C (d_out x NB) = G_i^T diag(mask_i) A_i[:, kb:kb+N]
  panel_xty<scalar_t, acc_t>(micro, Gi, d_out, 1, d_out, Ai + kb, d_in, 1, N, T, scale, C, NB, pack);
  double s = 0.0;
  for (int64_t m = 0; m < d_out; ++m) {
    acc_t row = 0;
    for (int64_t n = 0; n < N; ++n) row += C[m * NB + n] * C[m * NB + n];
    s += static_cast<double>(row);
  }
  return s;
}

template <typename scalar_t, typename acc_t>
double bias_sqsum(const scalar_t* Gi, const acc_t* mi, int64_t T, int64_t d_out, acc_t* buf) {
  std::fill(buf, buf + d_out, acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    const acc_t s = mi ? mi[t] : acc_t(1);
    const scalar_t* g = Gi + t * d_out;
    for (int64_t o = 0; o < d_out; ++o) buf[o] += s * static_cast<acc_t>(g[o]);
  }
  double s = 0.0;
  for (int64_t o = 0; o < d_out; ++o) s += static_cast<double>(buf[o]) * buf[o];
  return s;
}

// ---- ghost norm: one (sb, rb) pair of T x T tiles of one example -----------------------------
// returns (sum w * m_s m_r <A_s,A_r> <G_s,G_r>, sum w * m_s m_r <G_s,G_r>), w = 2 off-diagonal
template <typename scalar_t, typename acc_t>
std::pair<double, double> ghost_tile(MicroFn<scalar_t, acc_t> micro, const scalar_t* Ai,
                                     const scalar_t* Gi, const acc_t* mi, int64_t T, int64_t d_in,
                                     int64_t d_out, int64_t sb, int64_t rb, acc_t* GA, acc_t* GG,
                                     acc_t* pack) {
  const int64_t ms = std::min(TB, T - sb), nr = std::min(TB, T - rb);
  auto one = [](int64_t) { return acc_t(1); };
  // GA[s][r] = <A_{sb+s}, A_{rb+r}>: X(l=k, m=s) = A[(sb+s)*d_in + k], Y(l=k, n=r) likewise
  panel_xty<scalar_t, acc_t>(micro, Ai + sb * d_in, 1, d_in, ms, Ai + rb * d_in, 1, d_in, nr, d_in,
                             one, GA, TB, pack);
  panel_xty<scalar_t, acc_t>(micro, Gi + sb * d_out, 1, d_out, ms, Gi + rb * d_out, 1, d_out, nr,
                             d_out, one, GG, TB, pack);
  const double w = (sb == rb) ? 1.0 : 2.0;
  double s = 0.0, b = 0.0;
  for (int64_t i = 0; i < ms; ++i) {
    const acc_t mrow = mi ? mi[sb + i] : acc_t(1);
    acc_t srow = 0, brow = 0;
    for (int64_t j = 0; j < nr; ++j) {
      const acc_t mm = mi ? mrow * mi[rb + j] : acc_t(1);
      const acc_t gg = GG[i * TB + j] * mm;
      srow += GA[i * TB + j] * gg;
      brow += gg;
    }
    s += static_cast<double>(srow);
    b += static_cast<double>(brow);
  }
  return {w * s, w * b};
}

void check_linear_inputs(const char* op, const at::Tensor& A, const at::Tensor& G,
                         const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(A.device().is_cpu() && G.device().is_cpu(), op, ": A and G must be CPU tensors");
  TORCH_CHECK(A.dim() == 3 && G.dim() == 3, op, ": expected A (B,T,d_in) and G (B,T,d_out), got ",
              A.sizes(), " and ", G.sizes());
  TORCH_CHECK(A.size(0) == G.size(0) && A.size(1) == G.size(1), op,
              ": A and G must agree in (B,T), got ", A.sizes(), " and ", G.sizes());
  TORCH_CHECK(A.scalar_type() == G.scalar_type(), op, ": A and G must have the same dtype, got ",
              A.scalar_type(), " and ", G.scalar_type());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op, ": A and G must be floating point, got ",
              A.scalar_type());
  if (mask) {
    TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be a CPU tensor");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == A.size(0) && mask->size(1) == A.size(1), op,
                ": mask must have shape (B,T)=(", A.size(0), ",", A.size(1), "), got ", mask->sizes());
  }
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<at::Tensor> mask_as(const std::optional<at::Tensor>& mask, at::ScalarType t) {
  if (!mask) return std::nullopt;
  return mask->to(t).contiguous();
}

}  // namespace

// ================================================================================================
at::Tensor sqnorm_linear_fused(const at::Tensor& A_, const at::Tensor& G_,
                               const std::optional<at::Tensor>& mask_, bool bias) {
  check_linear_inputs("sqnorm_linear_fused", A_, G_, mask_);
  const at::Tensor A = A_.contiguous(), G = G_.contiguous();
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2);
  const auto at_acc = acc_type(A.scalar_type());
  const auto mask = mask_as(mask_, at_acc);
  at::Tensor out = at::zeros({B}, A.options().dtype(at_acc));
  if (B == 0 || T == 0 || d_in == 0 || d_out == 0) return out;
  dispatch_float(A.scalar_type(), "sqnorm_linear_fused", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using acc_t = typename acc_of<scalar_t>::type;
    const auto micro = pick_micro<scalar_t, acc_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    const acc_t* m = mask ? mask->data_ptr<acc_t>() : nullptr;
    acc_t* o = out.data_ptr<acc_t>();
    const int64_t npanel = (d_in + NB - 1) / NB;
    const int nthreads = max_threads();
    if (B >= nthreads) {
      // one example per thread at a time; each thread reuses one panel buffer
#pragma omp parallel
      {
        std::vector<acc_t> C(d_out * NB), pack(KC * NB), bb(bias ? d_out : 0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < B; ++i) {
          const scalar_t* Ai = a + i * T * d_in;
          const scalar_t* Gi = g + i * T * d_out;
          const acc_t* mi = m ? m + i * T : nullptr;
          double s = 0.0;
          for (int64_t p = 0; p < npanel; ++p)
            s += fused_panel_sqsum<scalar_t, acc_t>(micro, Ai, Gi, mi, T, d_in, d_out, p * NB, C.data(), pack.data());
          if (bias) s += bias_sqsum<scalar_t, acc_t>(Gi, mi, T, d_out, bb.data());
          o[i] = static_cast<acc_t>(s);
        }
      }
    } else {
      // few examples: the panels of one example in parallel, summed in panel order
      std::vector<double> part(npanel);
      std::vector<acc_t> bb(bias ? d_out : 0);
      for (int64_t i = 0; i < B; ++i) {
        const scalar_t* Ai = a + i * T * d_in;
        const scalar_t* Gi = g + i * T * d_out;
        const acc_t* mi = m ? m + i * T : nullptr;
#pragma omp parallel
        {
          std::vector<acc_t> C(d_out * NB), pack(KC * NB);
#pragma omp for schedule(dynamic, 1)
          for (int64_t p = 0; p < npanel; ++p)
            part[p] = fused_panel_sqsum<scalar_t, acc_t>(micro, Ai, Gi, mi, T, d_in, d_out, p * NB, C.data(), pack.data());
        }
        double s = 0.0;
        for (int64_t p = 0; p < npanel; ++p) s += part[p];
        if (bias) s += bias_sqsum<scalar_t, acc_t>(Gi, mi, T, d_out, bb.data());
        o[i] = static_cast<acc_t>(s);
      }
    }
  });
  return out;
}

at::Tensor sqnorm_linear_ghost(const at::Tensor& A_, const at::Tensor& G_,
                               const std::optional<at::Tensor>& mask_, bool bias) {
  check_linear_inputs("sqnorm_linear_ghost", A_, G_, mask_);
  const at::Tensor A = A_.contiguous(), G = G_.contiguous();
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2);
  const auto at_acc = acc_type(A.scalar_type());
  const auto mask = mask_as(mask_, at_acc);
  at::Tensor out = at::zeros({B}, A.options().dtype(at_acc));
  if (B == 0 || T == 0) return out;
  dispatch_float(A.scalar_type(), "sqnorm_linear_ghost", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using acc_t = typename acc_of<scalar_t>::type;
    const auto micro = pick_micro<scalar_t, acc_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    const acc_t* m = mask ? mask->data_ptr<acc_t>() : nullptr;
    acc_t* o = out.data_ptr<acc_t>();
    const int64_t nt = (T + TB - 1) / TB;
    std::vector<std::pair<int64_t, int64_t>> pairs;  // upper triangle of tile pairs, fixed order
    for (int64_t r = 0; r < nt; ++r)
      for (int64_t s = 0; s <= r; ++s) pairs.emplace_back(s * TB, r * TB);
    const int64_t np = static_cast<int64_t>(pairs.size());
    const int nthreads = max_threads();
    auto example = [&](int64_t i, std::vector<double>& part_s, std::vector<double>& part_b,
                       bool parallel_pairs) {
      const scalar_t* Ai = a + i * T * d_in;
      const scalar_t* Gi = g + i * T * d_out;
      const acc_t* mi = m ? m + i * T : nullptr;
      auto run = [&](int64_t p, acc_t* GA, acc_t* GG, acc_t* pack) {
        auto r = ghost_tile<scalar_t, acc_t>(micro, Ai, Gi, mi, T, d_in, d_out, pairs[p].first,
                                             pairs[p].second, GA, GG, pack);
        part_s[p] = r.first;
        part_b[p] = r.second;
      };
      if (parallel_pairs) {
#pragma omp parallel
        {
          std::vector<acc_t> GA(TB * TB), GG(TB * TB), pack(KC * TB);
#pragma omp for schedule(dynamic, 1)
          for (int64_t p = 0; p < np; ++p) run(p, GA.data(), GG.data(), pack.data());
        }
      } else {
        std::vector<acc_t> GA(TB * TB), GG(TB * TB), pack(KC * TB);
        for (int64_t p = 0; p < np; ++p) run(p, GA.data(), GG.data(), pack.data());
      }
      double s = 0.0, b = 0.0;
      for (int64_t p = 0; p < np; ++p) { s += part_s[p]; b += part_b[p]; }
      o[i] = static_cast<acc_t>(bias ? s + b : s);
    };
    if (B >= nthreads) {
#pragma omp parallel
      {
        std::vector<double> ps(np), pb(np);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < B; ++i) example(i, ps, pb, false);
      }
    } else {
      std::vector<double> ps(np), pb(np);
      for (int64_t i = 0; i < B; ++i) example(i, ps, pb, true);
    }
  });
  return out;
}

std::vector<at::Tensor> clipped_sum_linear(const at::Tensor& A_, const at::Tensor& G_,
                                           const at::Tensor& coef_,
                                           const std::optional<at::Tensor>& mask_, bool bias) {
  check_linear_inputs("clipped_sum_linear", A_, G_, mask_);
  TORCH_CHECK(coef_.device().is_cpu(), "clipped_sum_linear: coef must be a CPU tensor");
  TORCH_CHECK(coef_.dim() == 1 && coef_.size(0) == A_.size(0),
              "clipped_sum_linear: coef must have shape (B,)=(", A_.size(0), "), got ", coef_.sizes());
  const at::Tensor A = A_.contiguous(), G = G_.contiguous();
  const int64_t B = A.size(0), T = A.size(1), d_in = A.size(2), d_out = G.size(2);
  const auto at_acc = acc_type(A.scalar_type());
  const auto mask = mask_as(mask_, at_acc);
  const at::Tensor coef = coef_.to(at_acc).contiguous();
  at::Tensor W = at::zeros({d_out, d_in}, A.options().dtype(at_acc));
  at::Tensor bsum = bias ? at::zeros({d_out}, A.options().dtype(at_acc)) : at::Tensor();
  const int64_t L = B * T;
  if (L == 0 || d_in == 0 || d_out == 0) return bias ? std::vector<at::Tensor>{W, bsum} : std::vector<at::Tensor>{W};
  dispatch_float(A.scalar_type(), "clipped_sum_linear", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using acc_t = typename acc_of<scalar_t>::type;
    const auto micro = pick_micro<scalar_t, acc_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    const acc_t* m = mask ? mask->data_ptr<acc_t>() : nullptr;
    const acc_t* c = coef.data_ptr<acc_t>();
    acc_t* w = W.data_ptr<acc_t>();
    // row scale of flattened row l = (i, t): coef_i * mask_it
    auto scale = [c, m, T](int64_t l) { return m ? c[l / T] * m[l] : c[l / T]; };
    const int64_t nmb = (d_out + MB_SUM - 1) / MB_SUM, nkb = (d_in + NB - 1) / NB;
    // work items: (d_out block, d_in panel); each owns its output region, no reduction needed
#pragma omp parallel
    {
      std::vector<acc_t> C(MB_SUM * NB), pack(KC * NB);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < nmb * nkb; ++item) {
        const int64_t mb = (item / nkb) * MB_SUM, kb = (item % nkb) * NB;
        const int64_t M = std::min(MB_SUM, d_out - mb), N = std::min(NB, d_in - kb);
        // C (M x N) = sum_l G[l, mb:mb+M]^T * scale(l) A[l, kb:kb+N]
        panel_xty<scalar_t, acc_t>(micro, g + mb, d_out, 1, M, a + kb, d_in, 1, N, L, scale, C.data(), NB, pack.data());
        for (int64_t i = 0; i < M; ++i)
          std::memcpy(w + (mb + i) * d_in + kb, C.data() + i * NB, N * sizeof(acc_t));
      }
    }
    if (bias) {
      acc_t* bs = bsum.data_ptr<acc_t>();
#pragma omp parallel for schedule(static)
      for (int64_t ob = 0; ob < d_out; ob += 64) {
        const int64_t oe = std::min(d_out, ob + 64);
        for (int64_t l = 0; l < L; ++l) {
          const acc_t s = scale(l);
          const scalar_t* gr = g + l * d_out;
          for (int64_t o = ob; o < oe; ++o) bs[o] += s * static_cast<acc_t>(gr[o]);
        }
      }
    }
  });
  return bias ? std::vector<at::Tensor>{W, bsum} : std::vector<at::Tensor>{W};
}

std::vector<at::Tensor> norm_affine_grads(const at::Tensor& xhat, const at::Tensor& G) {
  TORCH_CHECK(xhat.device().is_cpu() && G.device().is_cpu(), "norm_affine_grads: xhat and G must be CPU tensors");
  TORCH_CHECK(xhat.dim() == 3 && xhat.sizes() == G.sizes(),
              "norm_affine_grads: expected xhat and G of equal shape (B,N,C), got ", xhat.sizes(), " and ", G.sizes());
  TORCH_CHECK(xhat.scalar_type() == G.scalar_type(), "norm_affine_grads: xhat and G must have the same dtype");
  TORCH_CHECK(at::isFloatingType(xhat.scalar_type()), "norm_affine_grads: inputs must be floating point");
  const int64_t B = xhat.size(0), N = xhat.size(1), Cc = xhat.size(2);
  const auto at_acc = acc_type(xhat.scalar_type());
  at::Tensor gw = at::zeros({B, Cc}, xhat.options().dtype(at_acc));
  at::Tensor gb = at::zeros({B, Cc}, xhat.options().dtype(at_acc));
  if (B == 0 || N == 0 || Cc == 0) return {gw, gb};
  dispatch_float(xhat.scalar_type(), "norm_affine_grads", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using acc_t = typename acc_of<scalar_t>::type;
    const scalar_t* x = xhat.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    const int64_t xb = xhat.stride(0), xn = xhat.stride(1), xc = xhat.stride(2);
    const int64_t gsb = G.stride(0), gsn = G.stride(1), gsc = G.stride(2);
    acc_t* w = gw.data_ptr<acc_t>();
    acc_t* bb = gb.data_ptr<acc_t>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B; ++i) {  // strided: works on (B,C,HW) views permuted to (B,HW,C)
      acc_t* wi = w + i * Cc;
      acc_t* bi = bb + i * Cc;
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* xr = x + i * xb + n * xn;
        const scalar_t* gr = g + i * gsb + n * gsn;
        for (int64_t c = 0; c < Cc; ++c) {
          const acc_t gv = static_cast<acc_t>(gr[c * gsc]);
          wi[c] += gv * static_cast<acc_t>(xr[c * xc]);
          bi[c] += gv;
        }
      }
    }
  });
  return {gw, gb};
}

int64_t fused_workspace_bytes(int64_t T, int64_t d_in, int64_t d_out, int64_t elem_bytes) {
  (void)T;
  (void)d_in;
  return static_cast<int64_t>(max_threads()) * (d_out * NB + KC * NB + d_out) * elem_bytes +
         ((d_in + NB - 1) / NB) * 8;
}
int64_t ghost_workspace_bytes(int64_t T, int64_t d_in, int64_t d_out, int64_t elem_bytes) {
  (void)d_in;
  (void)d_out;
  const int64_t nt = (T + TB - 1) / TB;
  return static_cast<int64_t>(max_threads()) * ((2 * TB * TB + KC * TB) * elem_bytes + nt * (nt + 1) * 8);
}
int64_t clipped_sum_workspace_bytes(int64_t d_in, int64_t d_out, int64_t elem_bytes) {
  (void)d_in;
  (void)d_out;
  return static_cast<int64_t>(max_threads()) * (MB_SUM * NB + KC * NB) * elem_bytes;
}

}  // namespace dpldm
