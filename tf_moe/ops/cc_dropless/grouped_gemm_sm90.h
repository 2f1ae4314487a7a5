// A grouped GEMM over expert segments for Hopper (sm_90a), on CUTLASS 3:
// one persistent, warp-specialized kernel (TMA loads, warpgroup MMA) over the
// tiles of all experts, with the segment sizes read on the device, so that a
// call never waits for the host. Used by the CUDA handlers of
// grouped_matmul_cuda.cu.cc for bfloat16 and float16 (float32 accumulation).
//
//   kRowsTimesKernel    out_e [m_e, b] = rows_e [m_e, a] @ K_e [a, b]
//   kRowsTimesKernelT   out_e [m_e, b] = rows_e [m_e, a] @ K_e^T, K_e [b, a]
//   kKernelGrad         dK_e [a, b] = rows_e^T [a, m_e] @ grad_e [m_e, b]
//
// kRowsTimesKernel also fuses a per-expert bias and an optional relu:
// out_e = act(rows_e @ K_e + bias_e) (GroupedGemm::bias set; float32
// accumulation, bias and relu, one rounding).
//
// rows_e is segment e of rows [N, a] (segments in expert order, starting at
// row 0; m = group_sizes). Rows past the last segment give 0 and experts
// without rows get dK_e = 0, as in the cuBLAS and CPU handlers.
//
// Invalid group_sizes (a negative size, or sizes summing past N) cannot be
// checked without a host round trip. The kernels then compute nothing out
// of bounds: every output is set to 0 and a per-device flag in mapped host
// memory is raised, which the handlers report as an error on a later call
// (see grouped_matmul_cuda.cu.cc; TF_MOE_CHECK_GROUP_SIZES=sync checks
// synchronously instead).

#ifndef TF_MOE_OPS_CC_DROPLESS_GROUPED_GEMM_SM90_H_
#define TF_MOE_OPS_CC_DROPLESS_GROUPED_GEMM_SM90_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace tf_moe {
namespace sm90 {

enum class GroupedGemmOp { kRowsTimesKernel, kRowsTimesKernelT, kKernelGrad };
enum class Element { kBFloat16, kFloat16 };
// The kernel's tile and warp schedule (both with a 1 x 2 CTA cluster):
// kCooperative 128 x 256 tiles, two consumer warpgroups on one tile;
// kPingpong 64 x 256 tiles, the two warpgroups on alternate tiles (one's
// epilogue overlaps the other's mainloop; half the padding of an expert's
// last, partial M tile).
enum class Schedule { kCooperative, kPingpong };
// The CTA cluster (cooperative schedule only; ping-pong runs 1 x 2): 1 x 2,
// two N tiles of the same rows share (multicast) the rows' tile; 2 x 1, two
// M tiles share the other operand's tile, the larger of the two with a
// 128 x 256 tile (a fifth less L2 traffic per CTA), but the tile scheduler
// then rounds every group's M up to 256 rows.
enum class Cluster { k1x2, k2x1 };

struct GroupedGemm {
  GroupedGemmOp op;
  Element element;
  const void* rows;            // [N, a]
  const void* other;           // kernel [E, a, b] / [E, b, a], or grad [N, b]
  const int32_t* group_sizes;  // [E], device memory
  int64_t num_rows;            // N
  int64_t num_experts;         // E
  int64_t a, b;
  void* out;                   // [N, b], or dK [E, a, b]
  int* error_flag;             // device pointer of the mapped host flag
  Schedule schedule = Schedule::kCooperative;
  Cluster cluster = Cluster::k1x2;
  // The tile scheduler's order over each group's output tiles: along M
  // (CUTLASS's default for groups) or along N, in bands of `swizzle` tiles.
  bool raster_along_n = false;
  int swizzle = 1;             // 1, 2, 4 or 8
  const void* bias = nullptr;  // [E, b], kRowsTimesKernel only (or nullptr)
  int activation = 0;          // with bias: 0 none, 1 relu
};

// Whether this GPU and these sizes can take the kernel: compute capability
// 9.0, a and b multiples of 8 (16-byte TMA rows), 16-byte aligned buffers,
// sizes within int32, a bias only on kRowsTimesKernel. Otherwise the
// handlers use cuBLAS.
bool Supported(const GroupedGemm& g, int device);

// Device scratch bytes Run needs (problem table and CUTLASS workspace).
size_t ScratchBytes(const GroupedGemm& g, int device);

// Enqueues the grouped GEMM on `stream` (no synchronization). `scratch`:
// ScratchBytes bytes, 256-byte aligned. Returns "" or an error message.
std::string Run(const GroupedGemm& g, int device, void* scratch,
                cudaStream_t stream);

}  // namespace sm90
}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_DROPLESS_GROUPED_GEMM_SM90_H_
