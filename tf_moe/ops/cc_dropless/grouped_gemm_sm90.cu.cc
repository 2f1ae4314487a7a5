// CUTLASS 3 grouped GEMM for the dropless expert FFNs on Hopper; see
// grouped_gemm_sm90.h for the contract.
//
// Why CUTLASS and not cuBLAS: cuBLAS's grouped GEMM takes the problem sizes
// on the host (so every call waited for group_sizes, and one expert's GEMM of
// a few hundred rows under-filled the GPU). CUTLASS's sm90 grouped kernel
// reads per-group problem shapes and pointers from device memory and runs
// one persistent grid over all groups' tiles. A small kernel builds that
// table from group_sizes (a prefix sum) on the stream, just before it.
//
// Layouts (CUTLASS names the K x N matrix B's layout; all buffers are
// row-major in memory):
//   kRowsTimesKernel   M = m_e, N = b, K = a: A rows_e (K-major), B = K_e
//                      [a, b] (N-major, "RowMajor"), D [m_e, b].
//   kRowsTimesKernelT  the same with K_e [b, a]: B is K-major ("ColumnMajor").
//   kKernelGrad        M = a, N = b, K = m_e (ragged): A = rows_e^T
//                      (M-major, "ColumnMajor"), B = grad_e (N-major), D = dK_e.
// Empty experts get M = 0 (no tiles); their dK_e is zeroed by ZeroExperts.
//
// The fused bias (kRowsTimesKernel with GroupedGemm::bias) is a second
// epilogue, an epilogue visitor tree (BiasActivation): CUTLASS's ptr-array
// epilogue has no per-group bias of its own, but its row broadcast takes an
// array of per-group pointers (bias_e = bias + e * b, in the table).

#include "tf_moe/ops/cc_dropless/grouped_gemm_sm90.h"

#include <cub/block/block_scan.cuh>

#include <cmath>
#include <mutex>
#include <unordered_map>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace tf_moe {
namespace sm90 {
namespace {

using namespace cute;  // NOLINT: CuTe's shape vocabulary (Shape, _128, ...)

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// The fused epilogue: D = act(acc + bias_e) in float, rounded once to T.
// bias_e is a row broadcast (stride 0 in M, 1 in N) whose element T*
// makes its pointer an array indexed by the group. act is a lower bound
// given at run time (-inf: none, 0: relu; NaN-propagating max, like
// CUTLASS's ReLu): one max per element whichever the activation, so one
// kernel serves both and the fused configs add 4 kernels, not 8.
template <class T, class TileShape>
using BiasActivation = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<
        cutlass::epilogue::thread::LowerBound, T, float,
        cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<
            cutlass::plus, float, float,
            cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90AccFetch,
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, T*, float,
                                                    Stride<_0, _1, _0>>>>;

// The schedule's kernel pieces: the cooperative schedule (two consumer
// warpgroups share a 128 x 256 tile) or ping-pong (each warpgroup its own
// 64 x 256 tile, one's epilogue under the other's mainloop).
template <sm90::Schedule kSchedule>
struct ScheduleOf {
  using TileShape = Shape<_128, _256, _64>;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
};
template <>
struct ScheduleOf<sm90::Schedule::kPingpong> {
  using TileShape = Shape<_64, _256, _64>;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
};

// One kernel configuration: C not read (ElementC = void) and a cluster of
// two CTAs. 1 x 2 shares (multicasts) the rows' tile between two N tiles of
// the same rows, so a segment of one M tile (an expert's M) idles no CTA of
// the pair; 2 x 1 shares the other operand's tile between two M tiles
// (less traffic, but M rounded up to 256 rows per group: 2-6 % slower for
// all three products at E = 64 on an H100, 2026-12-05). Which wins where is
// measured on the GPU (benchmarks/gpu_grouped_gemm.sh;
// TF_MOE_CUTLASS_SCHEDULE, TF_MOE_CUTLASS_CLUSTER). kBias: the
// BiasActivation epilogue instead of D = acc (kRowsTimesKernel only).
template <class T, class LayoutA, class LayoutB, sm90::Schedule kSchedule,
          sm90::Cluster kCluster, bool kBias = false>
struct Config {
  using TileShape = typename ScheduleOf<kSchedule>::TileShape;
  using ClusterShape = cute::conditional_t<kCluster == sm90::Cluster::k2x1,
                                           Shape<_2, _1, _1>, Shape<_1, _2, _1>>;
  static constexpr int kAlignment = 8;  // 16 bytes of 16-bit elements
  static constexpr bool kHasBias = kBias;

  using Fusion = cute::conditional_t<
      kBias, BiasActivation<T, TileShape>,
      cutlass::epilogue::fusion::LinearCombination<T, float, void, float>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape,
      ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float,
      float, void, RowMajor*, kAlignment, T, RowMajor*, kAlignment,
      typename ScheduleOf<kSchedule>::EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA*,
      kAlignment, T, LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename ScheduleOf<kSchedule>::KernelSchedule>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The per-group table the kernel reads, in scratch memory.
template <class C, class T>
struct Table {
  UnderlyingShape* shapes;
  const T** a;
  const T** b;
  T** d;
  const T** bias;  // bias_e [b] (read only by the fused epilogue)
  typename C::StrideA* stride_a;
  typename C::StrideB* stride_b;
  typename C::StrideD* stride_d;
  int64_t* used;  // rows in segments (0 when group_sizes are invalid)
};

constexpr size_t Align(size_t n) { return (n + 255) / 256 * 256; }

template <class C, class T>
size_t TableBytes(int64_t e) {
  return Align(e * sizeof(UnderlyingShape)) + 4 * Align(e * sizeof(void*)) +
         Align(e * sizeof(typename C::StrideA)) +
         Align(e * sizeof(typename C::StrideB)) +
         Align(e * sizeof(typename C::StrideD)) + Align(sizeof(int64_t));
}

template <class C, class T>
Table<C, T> CarveTable(char* p, int64_t e) {
  Table<C, T> t;
  auto take = [&p](size_t bytes) { char* q = p; p += Align(bytes); return q; };
  t.shapes = reinterpret_cast<UnderlyingShape*>(take(e * sizeof(UnderlyingShape)));
  t.a = reinterpret_cast<const T**>(take(e * sizeof(void*)));
  t.b = reinterpret_cast<const T**>(take(e * sizeof(void*)));
  t.d = reinterpret_cast<T**>(take(e * sizeof(void*)));
  t.bias = reinterpret_cast<const T**>(take(e * sizeof(void*)));
  t.stride_a = reinterpret_cast<typename C::StrideA*>(take(e * sizeof(typename C::StrideA)));
  t.stride_b = reinterpret_cast<typename C::StrideB*>(take(e * sizeof(typename C::StrideB)));
  t.stride_d = reinterpret_cast<typename C::StrideD*>(take(e * sizeof(typename C::StrideD)));
  t.used = reinterpret_cast<int64_t*>(take(sizeof(int64_t)));
  return t;
}

constexpr int kTableThreads = 1024;

// Builds the table from group_sizes: segment starts by a block-wide prefix
// sum (each thread scans a run of experts), then one problem per expert.
// On invalid sizes every problem is empty, `used` is 0 and *error_flag = 1.
template <class C, class T>
__global__ void __launch_bounds__(kTableThreads)
BuildTable(GroupedGemmOp op, const int32_t* __restrict__ sizes, int64_t e,
           int64_t n, int64_t a, int64_t b, const T* rows, const T* other,
           const T* bias, T* out, Table<C, T> t, int* error_flag) {
  using Scan = cub::BlockScan<int64_t, kTableThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t per_thread = (e + kTableThreads - 1) / kTableThreads;
  const int64_t first = threadIdx.x * per_thread;
  const int64_t last = min(first + per_thread, e);
  int64_t local = 0;
  bool negative = false;
  for (int64_t i = first; i < last; ++i) {
    local += sizes[i];
    negative |= sizes[i] < 0;
  }
  int64_t start, total;
  Scan(scan_storage).ExclusiveSum(local, start, total);
  const bool invalid = __syncthreads_or(negative) || total > n;
  if (threadIdx.x == 0) {
    *t.used = invalid ? 0 : total;
    if (invalid) *reinterpret_cast<volatile int*>(error_flag) = 1;
  }
  for (int64_t i = first; i < last; ++i) {
    const int m = invalid ? 0 : sizes[i];
    switch (op) {
      case GroupedGemmOp::kRowsTimesKernel:
      case GroupedGemmOp::kRowsTimesKernelT:
        t.shapes[i] = UnderlyingShape(m, int(b), int(a));
        t.a[i] = rows + start * a;
        t.b[i] = other + i * a * b;
        t.d[i] = out + start * b;
        if constexpr (C::kHasBias) t.bias[i] = bias + i * b;
        t.stride_a[i] = cutlass::make_cute_packed_stride(
            typename C::StrideA{}, make_shape(m, int(a), 1));
        t.stride_b[i] = cutlass::make_cute_packed_stride(
            typename C::StrideB{}, make_shape(int(b), int(a), 1));
        t.stride_d[i] = cutlass::make_cute_packed_stride(
            typename C::StrideD{}, make_shape(m, int(b), 1));
        break;
      case GroupedGemmOp::kKernelGrad:
        // An expert without rows has no tiles (M = 0), not a K = 0 GEMM.
        t.shapes[i] = UnderlyingShape(m == 0 ? 0 : int(a), int(b), m);
        t.a[i] = rows + start * a;
        t.b[i] = other + start * b;
        t.d[i] = out + i * a * b;
        t.stride_a[i] = cutlass::make_cute_packed_stride(
            typename C::StrideA{}, make_shape(int(a), m, 1));
        t.stride_b[i] = cutlass::make_cute_packed_stride(
            typename C::StrideB{}, make_shape(int(b), m, 1));
        t.stride_d[i] = cutlass::make_cute_packed_stride(
            typename C::StrideD{}, make_shape(int(a), int(b), 1));
        break;
    }
    start += m;
  }
}

// out[used:, :] = 0 for out [n, width] (16-byte stores; width % 8 == 0).
__global__ void ZeroTail(const int64_t* __restrict__ used, int64_t n,
                         int64_t width, uint4* out) {
  const int64_t vectors = n * width / 8;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t i = *used * width / 8 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       i < vectors; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = zero;
  }
}

// dK_e = 0 for experts without rows (all of them if the sizes were invalid):
// blockIdx.y is the expert, blocks of non-empty experts return at once.
__global__ void ZeroExperts(const int32_t* __restrict__ sizes,
                            const int64_t* __restrict__ used,
                            int64_t expert_vectors, uint4* out) {
  const int64_t e = blockIdx.y;
  if (sizes[e] != 0 && *used != 0) return;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4* expert = out + e * expert_vectors;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
       i < expert_vectors; i += int64_t(gridDim.x) * blockDim.x) {
    expert[i] = zero;
  }
}

int SmCount(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it == counts.end()) {
    it = counts.emplace(device,
                        cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device))
             .first;
  }
  return it->second;
}

template <class C, class T>
typename C::Gemm::Arguments MakeArguments(const GroupedGemm& g, int device,
                                          const Table<C, T>& t) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = SmCount(device);
  typename C::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {static_cast<int>(g.num_experts), t.shapes, nullptr},
      {t.a, t.stride_a, t.b, t.stride_b},
      {{}, nullptr, t.stride_d, t.d, t.stride_d},
      hw};
  using RasterOrder = decltype(args.scheduler.raster_order);
  args.scheduler.raster_order =
      g.raster_along_n ? RasterOrder::AlongN : RasterOrder::AlongM;
  args.scheduler.max_swizzle_size = g.swizzle;
  if constexpr (C::kHasBias) {
    // BiasActivation's arguments: op_0 (acc + bias: op_1 the bias), op_1
    // the lower bound.
    args.epilogue.thread.op_0.op_1.ptr_row = t.bias;
    args.epilogue.thread.op_1.lower_bound =
        g.activation == 1 ? 0.0f : -INFINITY;
  } else {
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
  }
  return args;
}

template <class C, class T>
size_t ScratchBytesFor(const GroupedGemm& g, int device) {
  Table<C, T> t{};
  return TableBytes<C, T>(g.num_experts) +
         Align(C::Gemm::get_workspace_size(MakeArguments<C, T>(g, device, t)));
}

template <class C, class T>
std::string RunFor(const GroupedGemm& g, int device, void* scratch,
                   cudaStream_t stream) {
  char* base = static_cast<char*>(scratch);
  Table<C, T> t = CarveTable<C, T>(base, g.num_experts);
  void* workspace = base + TableBytes<C, T>(g.num_experts);
  const T* rows = static_cast<const T*>(g.rows);
  const T* other = static_cast<const T*>(g.other);
  T* out = static_cast<T*>(g.out);
  BuildTable<C, T><<<1, kTableThreads, 0, stream>>>(
      g.op, g.group_sizes, g.num_experts, g.num_rows, g.a, g.b, rows, other,
      static_cast<const T*>(g.bias), out, t, g.error_flag);
  const int sms = SmCount(device);
  if (g.op == GroupedGemmOp::kKernelGrad) {
    const int64_t expert_vectors = g.a * g.b / 8;
    const int64_t blocks = std::min<int64_t>((expert_vectors + 255) / 256, 64);
    ZeroExperts<<<dim3(blocks, g.num_experts), 256, 0, stream>>>(
        g.group_sizes, t.used, expert_vectors, static_cast<uint4*>(g.out));
  } else {
    // Also with the fused bias: the tail is in no group's M, so the GEMM
    // never writes it (0, not act(bias)).
    ZeroTail<<<2 * sms, 256, 0, stream>>>(t.used, g.num_rows, g.b,
                                          static_cast<uint4*>(g.out));
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return std::string("launching the grouped GEMM's table kernels failed: ") +
           cudaGetErrorString(e);
  }
  typename C::Gemm gemm;
  auto args = MakeArguments<C, T>(g, device, t);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    return "CUTLASS cannot run this grouped GEMM (alignment)";
  }
  if (auto s = gemm.initialize(args, workspace, stream);
      s != cutlass::Status::kSuccess) {
    return std::string("CUTLASS grouped GEMM initialize failed: ") +
           cutlassGetStatusString(s);
  }
  if (auto s = gemm.run(stream); s != cutlass::Status::kSuccess) {
    return std::string("CUTLASS grouped GEMM launch failed: ") +
           cutlassGetStatusString(s) + " (" +
           cudaGetErrorString(cudaGetLastError()) + ")";
  }
  return "";
}

// Calls f(ConfigTag<C, T>{}) with the kernel configuration C (element type T)
// of `g`: its element type, schedule, cluster, op and bias. One decision
// tree for Run and ScratchBytes. Configurations built: cooperative with
// either cluster, ping-pong 1 x 2; four kernels each per element type.
template <class C, class T>
struct ConfigTag {
  using Config = C;
  using Element = T;
};

template <class T, Schedule kSchedule, Cluster kCluster, class F>
auto WithOpConfig(const GroupedGemm& g, F&& f) {
  switch (g.op) {
    case GroupedGemmOp::kRowsTimesKernel:
      if (g.bias != nullptr) {
        return f(ConfigTag<Config<T, RowMajor, RowMajor, kSchedule, kCluster, true>, T>{});
      }
      return f(ConfigTag<Config<T, RowMajor, RowMajor, kSchedule, kCluster>, T>{});
    case GroupedGemmOp::kRowsTimesKernelT:
      return f(ConfigTag<Config<T, RowMajor, ColumnMajor, kSchedule, kCluster>, T>{});
    case GroupedGemmOp::kKernelGrad:
      break;
  }
  return f(ConfigTag<Config<T, ColumnMajor, RowMajor, kSchedule, kCluster>, T>{});
}

template <class T, class F>
auto WithKernelConfig(const GroupedGemm& g, F&& f) {
  if (g.schedule == Schedule::kPingpong) {
    return WithOpConfig<T, Schedule::kPingpong, Cluster::k1x2>(g, f);
  }
  if (g.cluster == Cluster::k2x1) {
    return WithOpConfig<T, Schedule::kCooperative, Cluster::k2x1>(g, f);
  }
  return WithOpConfig<T, Schedule::kCooperative, Cluster::k1x2>(g, f);
}

template <class F>
auto WithConfig(const GroupedGemm& g, F&& f) {
  if (g.element == Element::kBFloat16) {
    return WithKernelConfig<cutlass::bfloat16_t>(g, f);
  }
  return WithKernelConfig<cutlass::half_t>(g, f);
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool Supported(const GroupedGemm& g, int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  // (num_experts is ZeroExperts' grid height, at most 65535.)
  return major == 9 && minor == 0 && g.num_experts > 0 &&
         g.num_experts <= 65535 && g.a > 0 && g.b > 0 &&
         g.a % 8 == 0 && g.b % 8 == 0 && g.num_rows < kMax && g.a < kMax &&
         g.b < kMax && Aligned(g.rows) && Aligned(g.other) && Aligned(g.out) &&
         (g.bias == nullptr ||
          (g.op == GroupedGemmOp::kRowsTimesKernel && Aligned(g.bias)));
}

size_t ScratchBytes(const GroupedGemm& g, int device) {
  return WithConfig(g, [&](auto tag) {
    using Tag = decltype(tag);
    return ScratchBytesFor<typename Tag::Config, typename Tag::Element>(g, device);
  });
}

std::string Run(const GroupedGemm& g, int device, void* scratch,
                cudaStream_t stream) {
  return WithConfig(g, [&](auto tag) {
    using Tag = decltype(tag);
    return RunFor<typename Tag::Config, typename Tag::Element>(g, device, scratch, stream);
  });
}

}  // namespace sm90
}  // namespace tf_moe
