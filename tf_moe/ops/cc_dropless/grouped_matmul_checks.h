// Argument checks of the grouped matmul, shared by its CPU FFI handlers
// (grouped_matmul_ffi.cc), TF CPU kernels (tf_ops.cc) and CUDA handlers
// (grouped_matmul_cuda.cu.cc). No Eigen here, so nvcc compiles it as is.
//
// Shape letters: N rows, a input dim, b output dim, E experts.

#ifndef TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CHECKS_H_
#define TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CHECKS_H_

#include <cstdint>
#include <string>

#include "tf_moe/ops/cc/ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {

// Empty when every group size is >= 0 and they sum to at most num_rows; else
// the message, with the numbers. The GEMMs trust sizes that pass.
inline std::string ValidateGroupSizes(const int32_t* group_sizes,
                                      int64_t num_experts, int64_t num_rows) {
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (group_sizes[e] < 0) {
      return "`group_sizes` must be >= 0. Received: group_sizes[" +
             std::to_string(e) + "]=" + std::to_string(group_sizes[e]);
    }
    total += group_sizes[e];
  }
  if (total > num_rows) {
    return "`group_sizes` must sum to at most the number of rows N=" +
           std::to_string(num_rows) +
           ". Received: sum(group_sizes)=" + std::to_string(total) +
           " over E=" + std::to_string(num_experts) + " experts";
  }
  return std::string();
}

// out = grouped_matmul(rows [N, a], kernel [E, a, b] ([E, b, a] when
// transposed), group_sizes [E]) -> [N, b], one dtype.
inline ffi::Error CheckGroupedMatmul(const ffi::AnyBuffer& rows,
                                     const ffi::AnyBuffer& kernel,
                                     const ffi::Buffer<ffi::S32>& group_sizes,
                                     int64_t transpose_kernel,
                                     const ffi::AnyBuffer& out) {
  if (transpose_kernel != 0 && transpose_kernel != 1) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `transpose_kernel` must be 0 or 1. Received: "
        "transpose_kernel=" + std::to_string(transpose_kernel));
  }
  auto r = rows.dimensions();
  auto k = kernel.dimensions();
  auto s = group_sizes.dimensions();
  auto o = out.dimensions();
  if (r.size() != 2 || k.size() != 3 || o.size() != 2 || s.size() != 1 ||
      s[0] != k[0] || o[0] != r[0] ||
      (transpose_kernel ? k[2] : k[1]) != r[1] ||
      (transpose_kernel ? k[1] : k[2]) != o[1] ||
      kernel.element_type() != rows.element_type() ||
      out.element_type() != rows.element_type()) {
    return ffi::Error::InvalidArgument(
        "tf_moe: grouped matmul needs rows [N, a], kernel [E, a, b] ([E, b, "
        "a] when transposed), group_sizes [E] and output [N, b] of one "
        "dtype. Received: rows.shape=" + DimsToString(r) +
        ", kernel.shape=" + DimsToString(k) +
        ", group_sizes.shape=" + DimsToString(s) +
        ", output.shape=" + DimsToString(o) +
        ", transpose_kernel=" + std::to_string(transpose_kernel));
  }
  return ffi::Error::Success();
}

// The `activation` attribute of the fused bias call.
enum class FusedActivation : int64_t { kNone = 0, kRelu = 1 };

// out = act(grouped_matmul(rows, kernel [E, a, b]) + bias [E, b]) -> [N, b],
// one dtype: the activation, the checks of CheckGroupedMatmul (kernel not
// transposed), then bias.
inline ffi::Error CheckGroupedMatmulBias(
    const ffi::AnyBuffer& rows, const ffi::AnyBuffer& kernel,
    const ffi::AnyBuffer& bias, const ffi::Buffer<ffi::S32>& group_sizes,
    int64_t activation, const ffi::AnyBuffer& out) {
  if (activation != static_cast<int64_t>(FusedActivation::kNone) &&
      activation != static_cast<int64_t>(FusedActivation::kRelu)) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `activation` must be 0 (none) or 1 (relu). Received: "
        "activation=" + std::to_string(activation));
  }
  if (auto e = CheckGroupedMatmul(rows, kernel, group_sizes,
                                  /*transpose_kernel=*/0, out);
      !e.success()) {
    return e;
  }
  auto k = kernel.dimensions();
  auto c = bias.dimensions();
  if (c.size() != 2 || c[0] != k[0] || c[1] != k[2]) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `bias` must be [E, b] = [" + std::to_string(k[0]) + ", " +
        std::to_string(k[2]) + "]. Received: bias.shape=" + DimsToString(c));
  }
  if (bias.element_type() != rows.element_type()) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `bias` must have the dtype of `rows`. Received: XLA FFI "
        "dtypes bias=" + std::to_string(static_cast<int>(bias.element_type())) +
        ", rows=" + std::to_string(static_cast<int>(rows.element_type())));
  }
  return ffi::Error::Success();
}

// kernel_grad [E, a, b] of rows [N, a], grad [N, b], group_sizes [E], one
// dtype.
inline ffi::Error CheckKernelGrad(const ffi::AnyBuffer& rows,
                                  const ffi::AnyBuffer& grad,
                                  const ffi::Buffer<ffi::S32>& group_sizes,
                                  const ffi::AnyBuffer& kernel_grad) {
  auto r = rows.dimensions();
  auto g = grad.dimensions();
  auto s = group_sizes.dimensions();
  auto k = kernel_grad.dimensions();
  if (r.size() != 2 || g.size() != 2 || k.size() != 3 || s.size() != 1 ||
      s[0] != k[0] || g[0] != r[0] || k[1] != r[1] || k[2] != g[1] ||
      grad.element_type() != rows.element_type() ||
      kernel_grad.element_type() != rows.element_type()) {
    return ffi::Error::InvalidArgument(
        "tf_moe: grouped matmul kernel gradient needs rows [N, a], grad "
        "[N, b], group_sizes [E] and kernel_grad [E, a, b] of one dtype. "
        "Received: rows.shape=" + DimsToString(r) + ", grad.shape=" +
        DimsToString(g) + ", group_sizes.shape=" + DimsToString(s) +
        ", kernel_grad.shape=" + DimsToString(k));
  }
  return ffi::Error::Success();
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CHECKS_H_
