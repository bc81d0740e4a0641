// Thin pybind11 layer of dpldm._cuda (flash-attention style): checks inputs, makes them
// contiguous, converts mask/coef to fp32, and forwards to the launchers in linear_norm_cuda.cu.
// Same call signatures as the CPU ops of dpldm._C (csrc/bindings.cpp), so kernels/linear.py
// wraps both the same way.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace dpldm_cuda {
at::Tensor sqnorm_fused_cuda(const at::Tensor& A, const at::Tensor& G, const c10::optional<at::Tensor>& M, bool bias);
at::Tensor sqnorm_ghost_cuda(const at::Tensor& A, const at::Tensor& G, const c10::optional<at::Tensor>& M, bool bias);
std::vector<at::Tensor> clipped_sum_cuda(const at::Tensor& A, const at::Tensor& G, const at::Tensor& coef,
                                         const c10::optional<at::Tensor>& M, bool bias);
}  // namespace dpldm_cuda

namespace {

void check(const char* op, const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(A.is_cuda() && G.is_cuda(), op, ": A and G must be CUDA tensors");
  TORCH_CHECK(A.device() == G.device(), op, ": A and G must be on one device");
  TORCH_CHECK(A.dim() == 3 && G.dim() == 3 && A.size(0) == G.size(0) && A.size(1) == G.size(1), op,
              ": expected A (B,T,d_in) and G (B,T,d_out), got ", A.sizes(), " and ", G.sizes());
  TORCH_CHECK(A.scalar_type() == G.scalar_type(), op, ": A and G must have the same dtype");
  const auto t = A.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": dtype must be fp32, fp16 or bf16, got ", t);
  TORCH_CHECK(A.size(1) < (int64_t(1) << 31) && A.size(2) < (int64_t(1) << 31) && G.size(2) < (int64_t(1) << 31), op,
              ": dimensions must fit in int32");
  if (mask) {
    TORCH_CHECK(mask->device() == A.device(), op, ": mask must be on the device of A");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == A.size(0) && mask->size(1) == A.size(1), op,
                ": mask must have shape (B,T), got ", mask->sizes());
  }
}

std::optional<at::Tensor> f32(const std::optional<at::Tensor>& m) {
  if (!m) return std::nullopt;
  return m->to(at::kFloat).contiguous();
}

at::Tensor sqnorm_linear_fused(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& mask, bool bias) {
  check("sqnorm_linear_fused", A, G, mask);
  return dpldm_cuda::sqnorm_fused_cuda(A.contiguous(), G.contiguous(), f32(mask), bias);
}

at::Tensor sqnorm_linear_ghost(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& mask, bool bias) {
  check("sqnorm_linear_ghost", A, G, mask);
  return dpldm_cuda::sqnorm_ghost_cuda(A.contiguous(), G.contiguous(), f32(mask), bias);
}

std::vector<at::Tensor> clipped_sum_linear(const at::Tensor& A, const at::Tensor& G, const at::Tensor& coef,
                                           const std::optional<at::Tensor>& mask, bool bias) {
  check("clipped_sum_linear", A, G, mask);
  TORCH_CHECK(coef.device() == A.device() && coef.dim() == 1 && coef.size(0) == A.size(0),
              "clipped_sum_linear: coef must be a (B,) tensor on the device of A, got ", coef.sizes());
  auto res = dpldm_cuda::clipped_sum_cuda(A.contiguous(), G.contiguous(), coef.to(at::kFloat).contiguous(), f32(mask), bias);
  if (!bias) res.pop_back();
  return res;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpldm CUDA ops: per-example Linear gradient norms (fused, ghost) and clipped sums";
  m.def("sqnorm_linear_fused", &sqnorm_linear_fused, py::arg("A"), py::arg("G"), py::arg("mask") = py::none(),
        py::arg("bias") = false);
  m.def("sqnorm_linear_ghost", &sqnorm_linear_ghost, py::arg("A"), py::arg("G"), py::arg("mask") = py::none(),
        py::arg("bias") = false);
  m.def("clipped_sum_linear", &clipped_sum_linear, py::arg("A"), py::arg("G"), py::arg("coef"),
        py::arg("mask") = py::none(), py::arg("bias") = false);
}
