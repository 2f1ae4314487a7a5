// Grouped matmul over expert segments (dropless MoE), framework-free.
//
// Rows [N, a] are sorted by expert in segments padded to `tile` rows;
// tile_expert[t] is the expert of rows [t * tile, (t + 1) * tile), or E for
// unused tiles past the last segment (their outputs are 0).
//
//   GroupedMatmul:   out[r] = rows[r] @ K[e(r)]     K [E, a, b]
//                    (transpose_kernel: K [E, b, a], out[r] = rows[r] @ K[e(r)]^T)
//   GroupedMatmulKernelGrad:
//                    dK[e] = sum_{r: e(r) = e} rows[r]^T grad[r]   dK [E, a, b]
//
// Accumulates in float32 and rounds once to T.

#ifndef TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_
#define TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tf_moe/ops/cc/dispatch_core.h"

namespace tf_moe {

// Empty when every tile expert is in [0, num_experts]; else the message.
inline std::string ValidateTileExpert(const int32_t* tile_expert,
                                      int64_t num_tiles, int64_t num_experts) {
  for (int64_t t = 0; t < num_tiles; ++t) {
    if (tile_expert[t] < 0 || tile_expert[t] > num_experts) {
      return "tile " + std::to_string(t) + " has expert " +
             std::to_string(tile_expert[t]) + " outside [0, num_experts=" +
             std::to_string(num_experts) + "]";
    }
  }
  return "";
}

template <typename T>
void GroupedMatmul(const T* rows, const T* kernel, const int32_t* tile_expert,
                   int64_t num_rows, int64_t tile, int64_t num_experts,
                   int64_t a, int64_t b, bool transpose_kernel, T* out) {
  std::vector<float> acc(b);
  std::vector<float> row(a);
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t e = tile_expert[r / tile];
    T* o = out + r * b;
    if (e >= num_experts) {
      for (int64_t j = 0; j < b; ++j) o[j] = FromFloat<T>(0.0f);
      continue;
    }
    for (int64_t i = 0; i < a; ++i) row[i] = ToFloat(rows[r * a + i]);
    const T* k = kernel + e * a * b;
    if (!transpose_kernel) {  // k [a, b]
      for (int64_t j = 0; j < b; ++j) acc[j] = 0.0f;
      for (int64_t i = 0; i < a; ++i) {
        const float v = row[i];
        const T* ki = k + i * b;
        for (int64_t j = 0; j < b; ++j) acc[j] += v * ToFloat(ki[j]);
      }
    } else {  // k [b, a]
      for (int64_t j = 0; j < b; ++j) {
        const T* kj = k + j * a;
        float s = 0.0f;
        for (int64_t i = 0; i < a; ++i) s += row[i] * ToFloat(kj[i]);
        acc[j] = s;
      }
    }
    for (int64_t j = 0; j < b; ++j) o[j] = FromFloat<T>(acc[j]);
  }
}

template <typename T>
void GroupedMatmulKernelGrad(const T* rows, const T* grad,
                             const int32_t* tile_expert, int64_t num_rows,
                             int64_t tile, int64_t num_experts, int64_t a,
                             int64_t b, T* kernel_grad) {
  std::vector<float> acc(num_experts * a * b, 0.0f);
  std::vector<float> g(b);
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t e = tile_expert[r / tile];
    if (e >= num_experts) continue;
    for (int64_t j = 0; j < b; ++j) g[j] = ToFloat(grad[r * b + j]);
    float* k = acc.data() + e * a * b;
    for (int64_t i = 0; i < a; ++i) {
      const float v = ToFloat(rows[r * a + i]);
      if (v == 0.0f) continue;
      float* ki = k + i * b;
      for (int64_t j = 0; j < b; ++j) ki[j] += v * g[j];
    }
  }
  for (int64_t n = 0; n < num_experts * a * b; ++n) {
    kernel_grad[n] = FromFloat<T>(acc[n]);
  }
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_
