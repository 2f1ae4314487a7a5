// Grouped matmul over expert segments (dropless MoE), CPU, framework-free
// (pointers, sizes and Eigen; no TF, XLA or JAX types).
//
// Rows [N, a] are sorted by expert in contiguous segments: expert e owns rows
// [start_e, start_e + group_sizes[e]), start_e = sum_{e' < e} group_sizes[e'].
// Rows at or past sum(group_sizes) belong to no expert; their outputs are 0.
//
//   GroupedMatmul:   out[r] = rows[r] @ K[e(r)]     K [E, a, b]
//                    (transpose_kernel: K [E, b, a], out[r] = rows[r] @ K[e(r)]^T)
//                    (bias: out[r] = act(rows[r] @ K[e(r)] + bias[e(r)]),
//                    bias [E, b], act none or relu; rows past the last
//                    segment still give 0, not act(bias))
//   GroupedMatmulKernelGrad:
//                    dK[e] = rows_e^T @ grad_e       dK [E, a, b]; 0 for
//                    empty experts.
//
// Eigen GEMMs on each expert segment, hand-written because XLA's CPU backend
// has no grouped matmul (jax.lax.ragged_dot lowers densely on CPU: every row
// times every expert's kernel, then a mask; E times the FLOPs). float32
// segments are mapped in place; bfloat16/float16 ones are converted to float32
// in chunks of rows and multiplied in float32. Accumulates in float32 (the
// bias added and relu applied in float32 too) and rounds once to T. The tasks (forward: blocks of a segment's rows; kernel
// gradient: blocks of an expert's kernel_grad rows) run through a ParallelFor
// the caller supplies; each is one single-threaded Eigen GEMM (or a few, for
// 16-bit chunks).
//
// Call ValidateGroupSizes (grouped_matmul_checks.h) first: the GEMMs trust
// the sizes.
//
// Shape letters: N rows, a input dim, b output dim, E experts.

#ifndef TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_
#define TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "Eigen/Core"
#include "tf_moe/ops/cc/dispatch_core.h"

namespace tf_moe {

// Runs task(i) for every i in [0, num_tasks), possibly in parallel, and
// returns when all have run. The frameworks supply one over their CPU thread
// pools (grouped_matmul_ffi.cc: the XLA FFI thread pool; tf_ops.cc: TF's
// worker threads).
using ParallelFor = std::function<void(
    int64_t num_tasks, const std::function<void(int64_t)>& task)>;

inline void SerialFor(int64_t num_tasks,
                      const std::function<void(int64_t)>& task) {
  for (int64_t i = 0; i < num_tasks; ++i) task(i);
}

namespace grouped_matmul_internal {

using Matrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const Matrix>;
using MutableMap = Eigen::Map<Matrix>;
using StridedConstMap = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;

// Rows per task of the forward pass; columns of `a` per task of the kernel
// gradient. Below kMinParallelFlops a call runs on the calling thread.
constexpr int64_t kTaskRows = 256;
constexpr int64_t kTaskColumns = 64;
constexpr int64_t kMinParallelFlops = int64_t{1} << 22;

// Floats per conversion buffer (rows or outputs) of a 16-bit segment chunk.
constexpr int64_t kChunkFloats = int64_t{1} << 16;

// Rows per conversion chunk for rows of `width` floats (at least 1).
inline int64_t ChunkRows(int64_t width) {
  return std::max<int64_t>(1, kChunkFloats / std::max<int64_t>(1, width));
}

template <typename T>
void ToFloatBuffer(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]);
}

template <typename T>
void FromFloatBuffer(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FromFloat<T>(src[i]);
}

// out [n, b] = x [n, a] @ k (k [a, b], or [b, a] transposed), all float.
inline void SegmentGemm(const ConstMap& x, const float* k, int64_t a,
                        int64_t b, bool transpose_kernel, MutableMap* out) {
  if (transpose_kernel) {
    out->noalias() = x * ConstMap(k, b, a).transpose();
  } else {
    out->noalias() = x * ConstMap(k, a, b);
  }
}

// The parallel runner for a call of `flops` multiply-adds (x2).
inline const ParallelFor& Runner(const ParallelFor& parallel_for,
                                 int64_t flops) {
  static const ParallelFor serial = SerialFor;
  return flops >= kMinParallelFlops ? parallel_for : serial;
}

// y [m, b] = act(y + bias [b]) in float, before the one rounding to T.
// relu keeps NaN (NaN < 0 is false), as jax.nn.relu and CUTLASS's ReLu do.
inline void AddBiasActivation(const float* bias, bool relu, int64_t m,
                              int64_t b, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = y + i * b;
    for (int64_t j = 0; j < b; ++j) {
      const float v = row[j] + bias[j];
      row[j] = relu && v < 0.0f ? 0.0f : v;
    }
  }
}

// Starts of the segments: start[e] = sum of sizes before e; start[E] = end.
inline std::vector<int64_t> SegmentStarts(const int32_t* group_sizes,
                                          int64_t num_experts) {
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    start[e + 1] = start[e] + group_sizes[e];
  }
  return start;
}

}  // namespace grouped_matmul_internal

// rows [N, a], kernel [E, a, b] ([E, b, a] transposed) -> out [N, b]; with
// `bias` [E, b]: out[r] = act(rows[r] @ K[e(r)] + bias[e(r)]), relu when
// `relu` (no bias: no activation). 0 past the last segment.
// Tasks: blocks of kTaskRows rows of one segment.
template <typename T>
void GroupedMatmul(const T* rows, const T* kernel, const int32_t* group_sizes,
                   int64_t num_rows, int64_t num_experts, int64_t a, int64_t b,
                   bool transpose_kernel, T* out,
                   const ParallelFor& parallel_for = SerialFor,
                   const T* bias = nullptr, bool relu = false) {
  using namespace grouped_matmul_internal;  // NOLINT
  const std::vector<int64_t> start = SegmentStarts(group_sizes, num_experts);
  const int64_t used = start[num_experts];
  const ParallelFor& run = Runner(parallel_for, 2 * used * a * b);
  // 16-bit kernels (and biases) are converted to float once per non-empty
  // expert.
  std::vector<float> kernel_f, bias_f;
  if constexpr (!std::is_same_v<T, float>) {
    kernel_f.resize(num_experts * a * b);
    if (bias != nullptr) bias_f.resize(num_experts * b);
    run(num_experts, [&](int64_t e) {
      if (group_sizes[e] > 0) {
        ToFloatBuffer(kernel + e * a * b, a * b, kernel_f.data() + e * a * b);
        if (bias != nullptr) {
          ToFloatBuffer(bias + e * b, b, bias_f.data() + e * b);
        }
      }
    });
  }
  struct Block {
    int64_t expert, begin, end;  // rows [begin, end) of `expert`
  };
  std::vector<Block> blocks;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = start[e]; r < start[e + 1]; r += kTaskRows) {
      blocks.push_back({e, r, std::min(r + kTaskRows, start[e + 1])});
    }
  }
  run(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& block = blocks[i];
    const int64_t m = block.end - block.begin;
    if constexpr (std::is_same_v<T, float>) {
      ConstMap x(rows + block.begin * a, m, a);
      MutableMap y(out + block.begin * b, m, b);
      SegmentGemm(x, kernel + block.expert * a * b, a, b, transpose_kernel,
                  &y);
      if (bias != nullptr) {
        AddBiasActivation(bias + block.expert * b, relu, m, b, y.data());
      }
    } else {
      const float* k = kernel_f.data() + block.expert * a * b;
      const int64_t chunk = std::min(m, ChunkRows(std::max(a, b)));
      std::vector<float> rows_f(chunk * a), out_f(chunk * b);
      for (int64_t r = block.begin; r < block.end; r += chunk) {
        const int64_t c = std::min(chunk, block.end - r);
        ToFloatBuffer(rows + r * a, c * a, rows_f.data());
        ConstMap x(rows_f.data(), c, a);
        MutableMap y(out_f.data(), c, b);
        SegmentGemm(x, k, a, b, transpose_kernel, &y);
        if (bias != nullptr) {
          AddBiasActivation(bias_f.data() + block.expert * b, relu, c, b,
                            out_f.data());
        }
        FromFloatBuffer(out_f.data(), c * b, out + r * b);
      }
    }
  });
  // Rows past the last segment.
  std::fill(out + used * b, out + num_rows * b, FromFloat<T>(0.0f));
}

// rows [N, a], grad [N, b] -> kernel_grad [E, a, b].
// Tasks: blocks of kTaskColumns rows of one expert's kernel_grad [a, b].
template <typename T>
void GroupedMatmulKernelGrad(const T* rows, const T* grad,
                             const int32_t* group_sizes, int64_t num_rows,
                             int64_t num_experts, int64_t a, int64_t b,
                             T* kernel_grad,
                             const ParallelFor& parallel_for = SerialFor) {
  using namespace grouped_matmul_internal;  // NOLINT
  (void)num_rows;  // the sizes were validated against it
  const std::vector<int64_t> start = SegmentStarts(group_sizes, num_experts);
  const ParallelFor& run =
      Runner(parallel_for, 2 * start[num_experts] * a * b);
  const int64_t blocks_per_expert = (a + kTaskColumns - 1) / kTaskColumns;
  run(num_experts * blocks_per_expert, [&](int64_t i) {
    const int64_t e = i / blocks_per_expert;
    const int64_t i0 = (i % blocks_per_expert) * kTaskColumns;
    const int64_t w = std::min(kTaskColumns, a - i0);  // columns i0 .. i0 + w
    const int64_t n = group_sizes[e];
    T* dk = kernel_grad + (e * a + i0) * b;  // rows i0 .. i0 + w of dK[e]
    if constexpr (std::is_same_v<T, float>) {
      MutableMap out(dk, w, b);
      if (n == 0) {
        out.setZero();
      } else {
        StridedConstMap x(rows + start[e] * a + i0, n, w,
                          Eigen::OuterStride<>(a));
        out.noalias() = x.transpose() * ConstMap(grad + start[e] * b, n, b);
      }
    } else {
      Matrix acc = Matrix::Zero(w, b);
      const int64_t chunk = std::max<int64_t>(1, std::min(n, ChunkRows(b)));
      std::vector<float> rows_f(chunk * w), grad_f(chunk * b);
      for (int64_t r = 0; r < n; r += chunk) {
        const int64_t c = std::min(chunk, n - r);
        for (int64_t j = 0; j < c; ++j) {
          ToFloatBuffer(rows + (start[e] + r + j) * a + i0, w,
                        rows_f.data() + j * w);
        }
        ToFloatBuffer(grad + (start[e] + r) * b, c * b, grad_f.data());
        acc.noalias() += ConstMap(rows_f.data(), c, w).transpose() *
                         ConstMap(grad_f.data(), c, b);
      }
      FromFloatBuffer(acc.data(), w * b, dk);
    }
  });
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_DROPLESS_GROUPED_MATMUL_CORE_H_
