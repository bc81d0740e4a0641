// Thin pybind11 layer of dpldm._C (flash-attention style): argument checks live in the op
// functions (TORCH_CHECK with the op's name); this file only names and documents them.
// Python wrappers with the torch references: kernels/linear.py, kernels/norms.py,
// kernels/secure_noise.py (dispatch in kernels/__init__.py).
#include <torch/extension.h>

#include "dpldm_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpldm CPU ops: fused per-example norms, clipped sums, secure Gaussian noise";
  m.def("sqnorm_linear_fused", &dpldm::sqnorm_linear_fused, "(B,) ||G_i^T A_i||^2 (+bias), d_in x d_out panels",
        py::arg("A"), py::arg("G"), py::arg("mask") = py::none(), py::arg("bias") = false);
  m.def("sqnorm_linear_ghost", &dpldm::sqnorm_linear_ghost, "(B,) <A_i A_i^T, G_i G_i^T> (+bias), T x T tiles",
        py::arg("A"), py::arg("G"), py::arg("mask") = py::none(), py::arg("bias") = false);
  m.def("clipped_sum_linear", &dpldm::clipped_sum_linear, "[sum_i c_i G_i^T A_i, (bias sum)]",
        py::arg("A"), py::arg("G"), py::arg("coef"), py::arg("mask") = py::none(), py::arg("bias") = false);
  m.def("norm_affine_grads", &dpldm::norm_affine_grads, "[(B,C) weight grads, (B,C) bias grads]",
        py::arg("xhat"), py::arg("G"));
  m.def("fused_workspace_bytes", &dpldm::fused_workspace_bytes);
  m.def("ghost_workspace_bytes", &dpldm::ghost_workspace_bytes);
  m.def("clipped_sum_workspace_bytes", &dpldm::clipped_sum_workspace_bytes);
  m.def("chacha20_block", &dpldm::chacha20_block, "RFC 8439 2.3 block function -> 64 bytes",
        py::arg("key"), py::arg("counter"), py::arg("nonce"));
  m.def("chacha20_keystream", &dpldm::chacha20_keystream, py::arg("key"), py::arg("start_block"),
        py::arg("n_blocks"));
  m.def("secure_gaussian", &dpldm::secure_gaussian, py::arg("key"), py::arg("start_block"), py::arg("n"),
        py::arg("std") = 1.0, py::arg("components") = false);
  m.def("os_random_bytes", &dpldm::os_random_bytes, py::arg("n"));
}
