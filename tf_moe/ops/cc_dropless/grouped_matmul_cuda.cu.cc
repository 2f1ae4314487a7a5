// Typed XLA FFI handlers (platform "CUDA") for the dropless grouped matmul
// and its kernel adjoint: the same functions and signatures as the Host
// handlers of grouped_matmul_ffi.cc.
//
//   out[start_e : start_e + m_e] = rows[start_e : start_e + m_e] @ K[e]
//   (bias: act(rows[...] @ K[e] + bias[e]), act none or relu)
//   dK[e] = rows[segment e]^T @ grad[segment e]
//   start_e = m_0 + ... + m_{e-1}, m = group_sizes; rows past the last
//   segment give 0, experts without rows get dK[e] = 0.
//
// Two implementations; TF_MOE_GROUPED_GEMM picks one:
// - `cutlass` (where it applies: bfloat16/float16 on compute capability 9.0,
//   a and b multiples of 8; opt-in until checked on a GPU, see
//   CutlassEnabled): one CUTLASS 3 grouped GEMM over
//   all experts' tiles with the segment sizes read on the device
//   (grouped_gemm_sm90.h), so the call never waits for the host. Invalid
//   group_sizes cannot be rejected before the kernels run: they then write
//   zeros and raise a per-device flag that the next call on that device
//   reports as an InvalidArgument error (TF_MOE_CHECK_GROUP_SIZES=sync
//   checks every call synchronously, at the cost of a stream
//   synchronization).
// - `streams` (the default, and float32, other GPUs, other sizes): cuBLAS.
//   group_sizes [E]
//   are copied to the host (one small copy and a stream synchronization, the
//   same cost as the bounds check of the dispatch kernels) and validated,
//   and one GEMM per non-empty expert is issued, spread round-robin over 8
//   extra streams (fork/join with events on the XLA stream;
//   TF_MOE_GEMM_STREAMS=n sets n, 1 = all on the XLA stream). `grouped`
//   issues one `cublasGemmGroupedBatchedEx` launch (cuBLAS >= 12.5)
//   instead; measured slower (docs/benchmarks.md).
// Accumulation is float32 in both (CUBLAS_COMPUTE_32F, no TF32). The fused
// bias + activation is in the CUTLASS kernel's epilogue, and on the cuBLAS
// path one elementwise kernel after the GEMMs (AddBiasRows; float32 math
// there too, but the GEMM's output was rounded to the dtype first).
//
// cuBLAS is not linked: it is found at run time in the process (JAX's XLA
// has loaded libcublas.so.12 by the time a handler runs) with dlopen, so the
// library needs neither cuBLAS headers nor a matching toolkit at build time.
// The few declarations below are cuBLAS's stable C ABI (cublas_api.h).
//
// Targets (JAX: jax.ffi.register_ffi_target(name, pycapsule, platform="CUDA")):
//   tf_moe_grouped_matmul              TfMoeGroupedMatmulCuda
//   tf_moe_grouped_matmul_bias         TfMoeGroupedMatmulBiasCuda
//   tf_moe_grouped_matmul_kernel_grad  TfMoeGroupedMatmulKernelGradCuda
//   tf_moe_grouped_matmul_grad         TfMoeGroupedMatmulGradCuda (CUDA only:
//                                      d rows and d kernel in one call)
//
// Shape letters: N rows, a input dim, b output dim, E experts.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "tf_moe/ops/cc/ffi_common.h"
#include "tf_moe/ops/cc/mapped_record.h"
#include "tf_moe/ops/cc_dropless/grouped_gemm_sm90.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_checks.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace {

// --- cuBLAS, resolved at run time ------------------------------------------

using CublasHandle = void*;  // cublasHandle_t
constexpr int kCublasSuccess = 0;     // CUBLAS_STATUS_SUCCESS
constexpr int kOpN = 0;               // CUBLAS_OP_N
constexpr int kOpT = 1;               // CUBLAS_OP_T
constexpr int kCompute32F = 68;       // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;      // CUBLAS_GEMM_DEFAULT

struct Cublas {
  int (*create)(CublasHandle*);
  int (*set_stream)(CublasHandle, cudaStream_t);
  int (*gemm)(CublasHandle, int, int, int, int, int, const void*, const void*,
              cudaDataType, int, const void*, cudaDataType, int, const void*,
              void*, cudaDataType, int, int, int);
  int (*grouped)(CublasHandle, const int*, const int*, const int*, const int*,
                 const int*, const void*, const void* const*, cudaDataType,
                 const int*, const void* const*, cudaDataType, const int*,
                 const void*, void* const*, cudaDataType, const int*, int,
                 const int*, int);  // nullptr before cuBLAS 12.5
};

// The process's cuBLAS, or nullptr with *error set.
const Cublas* LoadCublas(std::string* error) {
  static std::string load_error;
  static const Cublas* cublas = [] () -> const Cublas* {
    void* lib = nullptr;
    for (const char* name : {"libcublas.so.12", "libcublas.so.13",
                             "libcublas.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      load_error = "tf_moe: the CUDA grouped matmul needs cuBLAS, and "
                   "libcublas.so.12/.13/.so could not be loaded: " +
                   std::string(dlerror());
      return nullptr;
    }
    auto* c = new Cublas;
    c->create = reinterpret_cast<decltype(c->create)>(dlsym(lib, "cublasCreate_v2"));
    c->set_stream =
        reinterpret_cast<decltype(c->set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    c->gemm = reinterpret_cast<decltype(c->gemm)>(dlsym(lib, "cublasGemmEx"));
    c->grouped = reinterpret_cast<decltype(c->grouped)>(
        dlsym(lib, "cublasGemmGroupedBatchedEx"));
    if (c->create == nullptr || c->set_stream == nullptr || c->gemm == nullptr) {
      load_error = "tf_moe: the loaded cuBLAS lacks cublasCreate_v2, "
                   "cublasSetStream_v2 or cublasGemmEx";
      return nullptr;
    }
    const char* mode = std::getenv("TF_MOE_GROUPED_GEMM");
    if (mode == nullptr || std::strcmp(mode, "grouped") != 0) c->grouped = nullptr;
    return c;
  }();
  if (cublas == nullptr) *error = load_error;
  return cublas;
}

// Per device: the cuBLAS handle of the XLA stream (rebound to the calling
// stream on every call), and the extra streams with their own handles and
// join events. Created on first use and kept for the process.
struct DeviceGemm {
  CublasHandle handle = nullptr;
  std::vector<cudaStream_t> streams;
  std::vector<CublasHandle> stream_handles;
  std::vector<cudaEvent_t> joins;
  cudaEvent_t fork = nullptr;
};

int ExtraStreams() {
  const char* value = std::getenv("TF_MOE_GEMM_STREAMS");
  const int n = value == nullptr ? 8 : std::atoi(value);
  return n <= 1 ? 0 : (n > 16 ? 16 : n);
}

ffi::Error DeviceGemmFor(cudaStream_t stream, const Cublas** cublas,
                         DeviceGemm** gemm) {
  std::string error;
  *cublas = LoadCublas(&error);
  if (*cublas == nullptr) return ffi::Error::Internal(error);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return ffi::Error::Internal("tf_moe: cudaGetDevice failed");
  }
  static std::mutex mutex;
  static std::unordered_map<int, DeviceGemm> devices;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = devices.find(device);
  if (it == devices.end()) {
    DeviceGemm g;
    if ((*cublas)->create(&g.handle) != kCublasSuccess) {
      return ffi::Error::Internal("tf_moe: cublasCreate failed");
    }
    for (int i = 0; i < ExtraStreams(); ++i) {
      cudaStream_t s;
      cudaEvent_t join;
      CublasHandle h;
      if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
          cudaEventCreateWithFlags(&join, cudaEventDisableTiming) != cudaSuccess ||
          (*cublas)->create(&h) != kCublasSuccess ||
          (*cublas)->set_stream(h, s) != kCublasSuccess) {
        return ffi::Error::Internal("tf_moe: creating GEMM streams failed");
      }
      g.streams.push_back(s);
      g.joins.push_back(join);
      g.stream_handles.push_back(h);
    }
    if (!g.streams.empty() &&
        cudaEventCreateWithFlags(&g.fork, cudaEventDisableTiming) != cudaSuccess) {
      return ffi::Error::Internal("tf_moe: creating GEMM events failed");
    }
    it = devices.emplace(device, std::move(g)).first;
  }
  *gemm = &it->second;
  if ((*cublas)->set_stream((*gemm)->handle, stream) != kCublasSuccess) {
    return ffi::Error::Internal("tf_moe: cublasSetStream failed");
  }
  return ffi::Error::Success();
}

// --- shapes and segment sizes ----------------------------------------------

ffi::Error CudaDataType(ffi::DataType dtype, cudaDataType* out, size_t* bytes) {
  switch (dtype) {
    case ffi::F32: *out = CUDA_R_32F; *bytes = 4; return ffi::Error::Success();
    case ffi::BF16: *out = CUDA_R_16BF; *bytes = 2; return ffi::Error::Success();
    case ffi::F16: *out = CUDA_R_16F; *bytes = 2; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "tf_moe: the grouped matmul supports float32, bfloat16 and float16");
  }
}

// Expert segments: sizes m_e and starts (host copies of group_sizes).
struct Segments {
  std::vector<int32_t> sizes;
  std::vector<int64_t> starts;  // [E + 1]
  int64_t used() const { return starts.back(); }
};

// Copies group_sizes [E] (shape already checked) to the host, synchronizing
// `stream`, checks the values (ValidateGroupSizes) and fills the segments.
ffi::Error ReadGroupSizes(cudaStream_t stream,
                          const ffi::Buffer<ffi::S32>& group_sizes,
                          int64_t num_rows, Segments* segments) {
  const int64_t num_experts = group_sizes.dimensions()[0];
  std::vector<int32_t>& sizes = segments->sizes;
  sizes.resize(num_experts);
  if (num_experts > 0) {
    cudaMemcpyAsync(sizes.data(), group_sizes.typed_data(),
                    num_experts * sizeof(int32_t), cudaMemcpyDeviceToHost,
                    stream);
    if (cudaStreamSynchronize(stream) != cudaSuccess) {
      return ffi::Error::Internal("tf_moe: reading group_sizes failed: " +
                                  std::string(cudaGetErrorString(cudaGetLastError())));
    }
  }
  std::string message = ValidateGroupSizes(sizes.data(), num_experts, num_rows);
  if (!message.empty()) return ffi::Error::InvalidArgument("tf_moe: " + message);
  segments->starts.assign(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    segments->starts[e + 1] = segments->starts[e] + sizes[e];
  }
  return ffi::Error::Success();
}

// GEMMs C = op(A) op(B) to issue together (column-major cuBLAS
// conventions), one entry per problem.
struct Problems {
  std::vector<int> transa, transb, m, n, k, lda, ldb, ldc;
  std::vector<const void*> a, b;
  std::vector<void*> c;
  void Add(int transa_, int transb_, int m_, int n_, int k_, const void* a_,
           int lda_, const void* b_, int ldb_, void* c_, int ldc_) {
    transa.push_back(transa_); transb.push_back(transb_);
    m.push_back(m_); n.push_back(n_); k.push_back(k_);
    a.push_back(a_); b.push_back(b_); c.push_back(c_);
    lda.push_back(lda_); ldb.push_back(ldb_); ldc.push_back(ldc_);
  }
  size_t size() const { return m.size(); }
};

// out_e [m, b] = rows_e [m, a] @ K_e for every non-empty expert; K [E, a, b]
// or, transposed, K [E, b, a] with out_e = rows_e @ K_e^T. Row-major out_e
// is column-major out_e^T [b, m] = K_e^T [b, a] @ rows_e^T [a, m]: K_e
// [a, b] row-major is K_e^T column-major (op N, ld b); K_e [b, a] needs op T
// (ld a); rows_e row-major is rows_e^T column-major (op N, ld a).
void AddMatmuls(const Segments& seg, const char* rows, const char* kernel,
                int64_t a, int64_t b, bool transpose_kernel, size_t bytes,
                char* out, Problems* p) {
  if (a == 0 || b == 0) return;
  for (size_t e = 0; e < seg.sizes.size(); ++e) {
    if (seg.sizes[e] == 0) continue;
    p->Add(transpose_kernel ? kOpT : kOpN, kOpN, static_cast<int>(b),
           seg.sizes[e], static_cast<int>(a), kernel + e * a * b * bytes,
           static_cast<int>(transpose_kernel ? a : b),
           rows + seg.starts[e] * a * bytes, static_cast<int>(a),
           out + seg.starts[e] * b * bytes, static_cast<int>(b));
  }
}

// dK_e [a, b] = rows_e^T [a, m] @ grad_e [m, b] for every non-empty expert.
// Column-major: dK_e^T [b, a] = grad_e^T [b, m] (grad_e row-major: op N,
// ld b) @ rows_e [m, a] (rows_e row-major is rows_e^T column-major: op T,
// ld a).
void AddKernelGrads(const Segments& seg, const char* rows, const char* grad,
                    int64_t a, int64_t b, size_t bytes, char* kernel_grad,
                    Problems* p) {
  if (a == 0 || b == 0) return;
  for (size_t e = 0; e < seg.sizes.size(); ++e) {
    if (seg.sizes[e] == 0) continue;
    p->Add(kOpN, kOpT, static_cast<int>(b), static_cast<int>(a), seg.sizes[e],
           grad + seg.starts[e] * b * bytes, static_cast<int>(b),
           rows + seg.starts[e] * a * bytes, static_cast<int>(a),
           kernel_grad + e * a * b * bytes, static_cast<int>(b));
  }
}

// Zeroes what the GEMMs do not write: rows past the last segment of an
// [N, width] output (all of it when the GEMMs are empty), and dK_e of
// experts without rows.
void ZeroRowTail(cudaStream_t stream, const Segments& seg, int64_t num_rows,
                 int64_t width, int64_t inner, size_t bytes, char* out) {
  const int64_t from = inner == 0 ? 0 : seg.used();
  if (from < num_rows) {
    cudaMemsetAsync(out + from * width * bytes, 0,
                    (num_rows - from) * width * bytes, stream);
  }
}
void ZeroEmptyExperts(cudaStream_t stream, const Segments& seg,
                      int64_t expert_bytes, char* kernel_grad) {
  for (size_t e = 0; e < seg.sizes.size(); ++e) {
    if (seg.sizes[e] == 0) {
      cudaMemsetAsync(kernel_grad + e * expert_bytes, 0, expert_bytes, stream);
    }
  }
}

// Issues the GEMMs: round-robin over the extra streams between a fork and a
// join on `stream` (default), on `stream` alone, or as one grouped launch.
ffi::Error RunGemms(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                    cudaDataType type, const Problems& p) {
  if (p.size() == 0) return ffi::Error::Success();
  const Cublas* cublas;
  DeviceGemm* gemm;
  if (auto e = DeviceGemmFor(stream, &cublas, &gemm); !e.success()) return e;
  const float one = 1.0f, zero = 0.0f;
  const int count = static_cast<int>(p.size());
  if (cublas->grouped != nullptr) {
    // Device pointer arrays [A..., B..., C...] in scratch memory.
    auto memory = scratch.Allocate(3 * count * sizeof(void*), alignof(void*));
    if (!memory.has_value()) {
      return ffi::Error::Internal("tf_moe: cannot allocate CUDA scratch memory");
    }
    std::vector<const void*> pointers(p.a);
    pointers.insert(pointers.end(), p.b.begin(), p.b.end());
    pointers.insert(pointers.end(), p.c.begin(), p.c.end());
    auto** device = static_cast<void**>(*memory);
    cudaMemcpyAsync(device, pointers.data(), pointers.size() * sizeof(void*),
                    cudaMemcpyHostToDevice, stream);
    std::vector<int> ones(count, 1);
    std::vector<float> alpha(count, one), beta(count, zero);
    int status = cublas->grouped(
        gemm->handle, p.transa.data(), p.transb.data(), p.m.data(), p.n.data(),
        p.k.data(), alpha.data(), device, type, p.lda.data(), device + count,
        type, p.ldb.data(), beta.data(), device + 2 * count, type,
        p.ldc.data(), count, ones.data(), kCompute32F);
    if (status != kCublasSuccess) {
      return ffi::Error::Internal("tf_moe: cublasGemmGroupedBatchedEx failed "
                                  "with status " + std::to_string(status));
    }
    return ffi::Error::Success();
  }
  // Fork: the extra streams start after the work already on `stream`.
  const int lanes = std::min<int>(gemm->streams.size(), count);
  if (lanes > 1) {
    cudaEventRecord(gemm->fork, stream);
    for (int s = 0; s < lanes; ++s) {
      cudaStreamWaitEvent(gemm->streams[s], gemm->fork, 0);
    }
  }
  for (int i = 0; i < count; ++i) {
    CublasHandle handle = lanes > 1 ? gemm->stream_handles[i % lanes] : gemm->handle;
    int status = cublas->gemm(handle, p.transa[i], p.transb[i], p.m[i], p.n[i], p.k[i],
                              &one, p.a[i], type, p.lda[i], p.b[i], type,
                              p.ldb[i], &zero, p.c[i], type, p.ldc[i],
                              kCompute32F, kGemmDefault);
    if (status != kCublasSuccess) {
      return ffi::Error::Internal("tf_moe: cublasGemmEx failed with status " +
                                  std::to_string(status));
    }
  }
  // Join: later work on `stream` (and XLA's buffer reuse) waits for all.
  for (int s = 0; s < (lanes > 1 ? lanes : 0); ++s) {
    cudaEventRecord(gemm->joins[s], gemm->streams[s]);
    cudaStreamWaitEvent(stream, gemm->joins[s], 0);
  }
  return ffi::Error::Success();
}

// --- bias and activation after the cuBLAS GEMMs ---------------------------

__device__ inline float ToF(float v) { return v; }
__device__ inline float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float ToF(__half v) { return __half2float(v); }
template <typename T> __device__ T FromF(float v);
template <> __device__ inline float FromF<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ inline __half FromF<__half>(float v) {
  return __float2half_rn(v);
}

// out[r] = act(out[r] + bias[e(r)]) [b] for the rows r < starts[E] (in
// segments); the tail stays 0. One block per row (grid-stride); e(r), the
// expert with starts[e] <= r < starts[e + 1] (never an empty one), by a
// binary search of starts [E + 1]. relu keeps NaN, as on the CPU.
template <typename T>
__global__ void AddBiasRows(const int64_t* __restrict__ starts,
                            int64_t num_experts, int64_t b,
                            const T* __restrict__ bias, bool relu, T* out) {
  const int64_t used = starts[num_experts];
  for (int64_t r = blockIdx.x; r < used; r += gridDim.x) {
    int64_t lo = 0, hi = num_experts;  // starts[lo] <= r < starts[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (starts[mid] <= r) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const T* bias_e = bias + lo * b;
    T* row = out + r * b;
    for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
      const float v = ToF(row[j]) + ToF(bias_e[j]);
      row[j] = FromF<T>(relu && v < 0.0f ? 0.0f : v);
    }
  }
}

// Enqueues AddBiasRows on `stream` (after the GEMMs, which RunGemms joined
// into it). The segment starts go to the device through scratch memory.
ffi::Error AddBias(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   ffi::DataType dtype, const Segments& seg, int64_t b,
                   const void* bias, bool relu, void* out) {
  if (seg.used() == 0 || b == 0) return ffi::Error::Success();
  const size_t bytes = seg.starts.size() * sizeof(int64_t);
  auto memory = scratch.Allocate(bytes, alignof(int64_t));
  if (!memory.has_value()) {
    return ffi::Error::Internal("tf_moe: cannot allocate CUDA scratch memory");
  }
  auto* starts = static_cast<int64_t*>(*memory);
  cudaMemcpyAsync(starts, seg.starts.data(), bytes, cudaMemcpyHostToDevice,
                  stream);
  const int64_t num_experts = static_cast<int64_t>(seg.sizes.size());
  const int blocks = static_cast<int>(std::min<int64_t>(seg.used(), 4096));
  const int threads = b >= 256 ? 256 : 128;
  switch (dtype) {
    case ffi::F32:
      AddBiasRows<<<blocks, threads, 0, stream>>>(
          starts, num_experts, b, static_cast<const float*>(bias), relu,
          static_cast<float*>(out));
      break;
    case ffi::BF16:
      AddBiasRows<<<blocks, threads, 0, stream>>>(
          starts, num_experts, b, static_cast<const __nv_bfloat16*>(bias),
          relu, static_cast<__nv_bfloat16*>(out));
      break;
    default:  // F16 (CudaDataType took only these three)
      AddBiasRows<<<blocks, threads, 0, stream>>>(
          starts, num_experts, b, static_cast<const __half*>(bias), relu,
          static_cast<__half*>(out));
      break;
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    return ffi::Error::Internal(
        std::string("tf_moe: launching the grouped matmul's bias kernel "
                    "failed: ") + cudaGetErrorString(e));
  }
  return ffi::Error::Success();
}

// --- the CUTLASS kernel (sm90) --------------------------------------------------

// *index = the position of getenv(name) among `choices`, 0 when unset; any
// other value is an InvalidArgument naming the variable and its values.
ffi::Error EnvChoice(const char* name, std::initializer_list<const char*> choices,
                     int* index) {
  const char* value = std::getenv(name);
  *index = 0;
  if (value == nullptr) return ffi::Error::Success();
  std::string allowed;
  for (const char* choice : choices) {
    if (std::strcmp(value, choice) == 0) return ffi::Error::Success();
    allowed += (allowed.empty() ? "" : ", ") + std::string(choice);
    ++*index;
  }
  *index = 0;
  return ffi::Error::InvalidArgument(std::string("tf_moe: ") + name +
                                     " must be one of " + allowed +
                                     " (or unset). Received: " + value);
}

// TF_MOE_GROUPED_GEMM: "cutlass" (the default; where UseCutlass accepts
// the call, else cuBLAS streams), "streams" or "grouped" (cuBLAS). Read on
// every call, so a process can switch. The CUTLASS kernel is the default
// since benchmarks/gpu_correctness.py passed with it on an H100 and it ran
// the dropless layer 1.8x faster than streams (docs/benchmarks.md,
// 2026-12-05).
ffi::Error CutlassEnabled(bool* enabled) {
  int choice;
  auto e = EnvChoice("TF_MOE_GROUPED_GEMM", {"cutlass", "streams", "grouped"}, &choice);
  *enabled = choice == 0;
  return e;
}

// TF_MOE_CUTLASS_SCHEDULE: the kernel's tile and warp schedule,
// "cooperative" (128 x 256 tiles, the default) or "pingpong" (64 x 256;
// grouped_gemm_sm90.h).
ffi::Error CutlassSchedule(sm90::Schedule* schedule) {
  int choice;
  auto e = EnvChoice("TF_MOE_CUTLASS_SCHEDULE", {"cooperative", "pingpong"}, &choice);
  *schedule = choice == 1 ? sm90::Schedule::kPingpong : sm90::Schedule::kCooperative;
  return e;
}

// TF_MOE_CUTLASS_CLUSTER: the cooperative kernel's CTA cluster
// (grouped_gemm_sm90.h): "1x2" (the default), "2x1", or "auto": 2 x 1 for
// the weight gradient (its M is the model width, never ragged, so the
// 256-row rounding costs nothing) and for row products whose segments
// average kLongSegmentRows rows or more (the rounding pads at most ~6 %),
// 1 x 2 otherwise. The average is N / E, known on the host (the sizes
// themselves stay on the device). Tuning: on an H100 neither 2x1 nor auto
// beat 1x2 (docs/benchmarks.md, 2026-12-06).
enum class ClusterMode { k1x2, k2x1, kAuto };  // in EnvChoice's order
constexpr int64_t kLongSegmentRows = 2048;

ffi::Error CutlassCluster(ClusterMode* mode) {
  int choice;
  auto e = EnvChoice("TF_MOE_CUTLASS_CLUSTER", {"1x2", "2x1", "auto"}, &choice);
  *mode = static_cast<ClusterMode>(choice);
  return e;
}

sm90::Cluster ClusterFor(ClusterMode mode, const sm90::GroupedGemm& g) {
  switch (mode) {
    case ClusterMode::k1x2:
      return sm90::Cluster::k1x2;
    case ClusterMode::k2x1:
      return sm90::Cluster::k2x1;
    case ClusterMode::kAuto:
      break;
  }
  const bool long_segments = g.num_rows >= kLongSegmentRows * g.num_experts;
  return g.op == sm90::GroupedGemmOp::kKernelGrad || long_segments
             ? sm90::Cluster::k2x1
             : sm90::Cluster::k1x2;
}

// TF_MOE_CUTLASS_RASTER: the tile scheduler's order, "m" (default) or "n",
// optionally with a swizzle band, e.g. "n4" (1, 2, 4, 8). Tuning only.
ffi::Error CutlassRaster(bool* along_n, int* swizzle) {
  const char* value = std::getenv("TF_MOE_CUTLASS_RASTER");
  *along_n = false;
  *swizzle = 1;
  if (value == nullptr || *value == 0) return ffi::Error::Success();
  const std::string v(value);
  const bool order_ok = v[0] == 'm' || v[0] == 'n';
  const std::string band = v.substr(1);
  if (!order_ok || !(band.empty() || band == "1" || band == "2" || band == "4" ||
                     band == "8")) {
    return ffi::Error::InvalidArgument(
        std::string("tf_moe: TF_MOE_CUTLASS_RASTER must be m or n, optionally "
                    "followed by a swizzle of 1, 2, 4 or 8 (e.g. n4), or unset. "
                    "Received: ") + value);
  }
  *along_n = v[0] == 'n';
  *swizzle = band.empty() ? 1 : std::stoi(band);
  return ffi::Error::Success();
}

// Read on every call (like TF_MOE_GROUPED_GEMM), so a process can switch.
bool SyncChecks() {
  const char* mode = std::getenv("TF_MOE_CHECK_GROUP_SIZES");
  return mode != nullptr && std::strcmp(mode, "sync") == 0;
}

// The error of an earlier call's invalid group_sizes, once.
ffi::Error ReportEarlierInvalidSizes(int* host_flag) {
  auto* flag = reinterpret_cast<volatile int*>(host_flag);
  if (*flag == 0) return ffi::Error::Success();
  *flag = 0;
  return ffi::Error::InvalidArgument(
      "tf_moe: an earlier grouped matmul on this GPU received invalid "
      "`group_sizes` (a negative size, or sizes summing past the number of "
      "rows N); its outputs were set to 0. Set TF_MOE_CHECK_GROUP_SIZES=sync "
      "to stop at that call with the values.");
}

// The CUTLASS problem `op` over rows [N, a] and `other` (kernel or grad)
// into `out`; UseCutlass sets the rest.
sm90::GroupedGemm MakeGemm(sm90::GroupedGemmOp op, const void* rows,
                           const void* other, int64_t num_rows, int64_t a,
                           int64_t b, void* out) {
  sm90::GroupedGemm g{};
  g.op = op;
  g.rows = rows;
  g.other = other;
  g.num_rows = num_rows;
  g.a = a;
  g.b = b;
  g.out = out;
  return g;
}

// Decides once per handler call whether the CUTLASS kernel computes all of
// `gemms` (*use; else cuBLAS computes all of them) and completes them (type,
// group sizes, schedule, error flag). Reports an earlier call's invalid
// group_sizes, and with TF_MOE_CHECK_GROUP_SIZES=sync checks this call's.
ffi::Error UseCutlass(cudaStream_t stream, ffi::DataType dtype,
                      const ffi::Buffer<ffi::S32>& group_sizes,
                      std::initializer_list<sm90::GroupedGemm*> gemms,
                      int* device, bool* use) {
  *use = false;
  bool enabled;
  if (auto e = CutlassEnabled(&enabled); !e.success()) return e;
  if (!enabled || (dtype != ffi::BF16 && dtype != ffi::F16)) {
    return ffi::Error::Success();
  }
  if (cudaGetDevice(device) != cudaSuccess) {
    return ffi::Error::Internal("tf_moe: cudaGetDevice failed");
  }
  sm90::Schedule schedule;
  if (auto e = CutlassSchedule(&schedule); !e.success()) return e;
  ClusterMode cluster;
  if (auto e = CutlassCluster(&cluster); !e.success()) return e;
  bool raster_along_n;
  int swizzle;
  if (auto e = CutlassRaster(&raster_along_n, &swizzle); !e.success()) return e;
  // An int the table kernel sets when group_sizes are invalid.
  int *host_flag, *device_flag;
  if (auto e = MappedRecordFor(&host_flag, &device_flag); !e.success()) return e;
  for (sm90::GroupedGemm* g : gemms) {
    g->element = dtype == ffi::BF16 ? sm90::Element::kBFloat16 : sm90::Element::kFloat16;
    g->group_sizes = group_sizes.typed_data();
    g->num_experts = group_sizes.dimensions()[0];
    g->schedule = schedule;
    g->cluster = ClusterFor(cluster, *g);
    g->raster_along_n = raster_along_n;
    g->swizzle = swizzle;
    g->error_flag = device_flag;
    if (!sm90::Supported(*g, *device)) return ffi::Error::Success();
  }
  if (auto e = ReportEarlierInvalidSizes(host_flag); !e.success()) return e;
  if (SyncChecks()) {
    Segments seg;
    if (auto e = ReadGroupSizes(stream, group_sizes, (*gemms.begin())->num_rows, &seg);
        !e.success()) {
      return e;
    }
  }
  *use = true;
  return ffi::Error::Success();
}

// Enqueues one grouped GEMM that UseCutlass accepted.
ffi::Error RunCutlass(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                      const sm90::GroupedGemm& g, int device) {
  // XLA's scratch allocator takes alignments up to 16 bytes; the table wants
  // 256 (TMA descriptors: 64), so over-allocate and align here.
  const size_t bytes = sm90::ScratchBytes(g, device);
  auto memory = scratch.Allocate(bytes + 256, 16);
  if (!memory.has_value()) {
    return ffi::Error::Internal("tf_moe: cannot allocate " +
                                std::to_string(bytes + 256) +
                                " bytes of CUDA scratch memory");
  }
  const uintptr_t address = reinterpret_cast<uintptr_t>(*memory);
  void* aligned = reinterpret_cast<void*>((address + 255) / 256 * 256);
  std::string error = sm90::Run(g, device, aligned, stream);
  if (!error.empty()) return ffi::Error::Internal("tf_moe: " + error);
  return ffi::Error::Success();
}

// --- handlers ----------------------------------------------------------------

// The cuBLAS type and element size of `rows`, and the checked segments.
ffi::Error Prepare(cudaStream_t stream, const ffi::AnyBuffer& rows,
                   const ffi::Buffer<ffi::S32>& group_sizes,
                   cudaDataType* type, size_t* bytes, Segments* seg) {
  if (auto e = CudaDataType(rows.element_type(), type, bytes); !e.success()) {
    return e;
  }
  return ReadGroupSizes(stream, group_sizes, rows.dimensions()[0], seg);
}

// The forward product after its checks: out = rows @ K[e] per segment, or
// act(rows @ K[e] + bias[e]) with `bias` (CUTLASS fuses bias and activation
// into the GEMM's epilogue; cuBLAS runs the plain GEMMs into `out`, then
// AddBias).
ffi::Error Forward(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   ffi::AnyBuffer rows, ffi::AnyBuffer kernel,
                   ffi::Buffer<ffi::S32> group_sizes, bool transpose_kernel,
                   const void* bias, bool relu, ffi::AnyBuffer out) {
  auto r = rows.dimensions();
  auto o = out.dimensions();
  auto g = MakeGemm(transpose_kernel ? sm90::GroupedGemmOp::kRowsTimesKernelT
                                     : sm90::GroupedGemmOp::kRowsTimesKernel,
                    rows.untyped_data(), kernel.untyped_data(), r[0], r[1], o[1],
                    out.untyped_data());
  g.bias = bias;
  g.activation = relu ? 1 : 0;
  int device;
  bool cutlass;
  if (auto e = UseCutlass(stream, rows.element_type(), group_sizes, {&g}, &device, &cutlass);
      !e.success()) {
    return e;
  }
  if (cutlass) return RunCutlass(stream, scratch, g, device);
  cudaDataType type;
  size_t bytes;
  Segments seg;
  if (auto e = Prepare(stream, rows, group_sizes, &type, &bytes, &seg);
      !e.success()) {
    return e;
  }
  auto* out_data = static_cast<char*>(out.untyped_data());
  ZeroRowTail(stream, seg, r[0], o[1], r[1], bytes, out_data);
  Problems p;
  AddMatmuls(seg, static_cast<const char*>(rows.untyped_data()),
             static_cast<const char*>(kernel.untyped_data()), r[1], o[1],
             transpose_kernel, bytes, out_data, &p);
  if (auto e = RunGemms(stream, scratch, type, p); !e.success()) return e;
  if (bias == nullptr) return ffi::Error::Success();
  return AddBias(stream, scratch, rows.element_type(), seg, o[1], bias, relu,
                 out_data);
}

ffi::Error GroupedMatmulCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                             ffi::AnyBuffer rows, ffi::AnyBuffer kernel,
                             ffi::Buffer<ffi::S32> group_sizes,
                             int64_t transpose_kernel,
                             ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckGroupedMatmul(rows, kernel, group_sizes, transpose_kernel,
                                  *out);
      !e.success()) {
    return e;
  }
  return Forward(stream, scratch, rows, kernel, group_sizes,
                 transpose_kernel != 0, /*bias=*/nullptr, /*relu=*/false, *out);
}

ffi::Error GroupedMatmulBiasCuda(cudaStream_t stream,
                                 ffi::ScratchAllocator scratch,
                                 ffi::AnyBuffer rows, ffi::AnyBuffer kernel,
                                 ffi::AnyBuffer bias,
                                 ffi::Buffer<ffi::S32> group_sizes,
                                 int64_t activation,
                                 ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckGroupedMatmulBias(rows, kernel, bias, group_sizes,
                                      activation, *out);
      !e.success()) {
    return e;
  }
  return Forward(stream, scratch, rows, kernel, group_sizes,
                 /*transpose_kernel=*/false, bias.untyped_data(),
                 activation == static_cast<int64_t>(FusedActivation::kRelu), *out);
}

ffi::Error GroupedMatmulKernelGradCuda(
    cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer rows,
    ffi::AnyBuffer grad, ffi::Buffer<ffi::S32> group_sizes,
    ffi::Result<ffi::AnyBuffer> kernel_grad) {
  if (auto e = CheckKernelGrad(rows, grad, group_sizes, *kernel_grad);
      !e.success()) {
    return e;
  }
  auto r = rows.dimensions();
  auto g = grad.dimensions();
  auto gemm = MakeGemm(sm90::GroupedGemmOp::kKernelGrad, rows.untyped_data(),
                       grad.untyped_data(), r[0], r[1], g[1], kernel_grad->untyped_data());
  int device;
  bool cutlass;
  if (auto e = UseCutlass(stream, rows.element_type(), group_sizes, {&gemm}, &device,
                          &cutlass);
      !e.success()) {
    return e;
  }
  if (cutlass) return RunCutlass(stream, scratch, gemm, device);
  cudaDataType type;
  size_t bytes;
  Segments seg;
  if (auto e = Prepare(stream, rows, group_sizes, &type, &bytes, &seg);
      !e.success()) {
    return e;
  }
  auto* dk = static_cast<char*>(kernel_grad->untyped_data());
  ZeroEmptyExperts(stream, seg, r[1] * g[1] * bytes, dk);
  Problems p;
  AddKernelGrads(seg, static_cast<const char*>(rows.untyped_data()),
                 static_cast<const char*>(grad.untyped_data()), r[1], g[1],
                 bytes, dk, &p);
  return RunGemms(stream, scratch, type, p);
}

// Both gradients of out = grouped_matmul(rows, kernel) in one call: one read
// of group_sizes (one stream synchronization instead of two), and the d rows
// and d kernel GEMMs of all experts issued together over the streams.
ffi::Error GroupedMatmulGradCuda(
    cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer rows,
    ffi::AnyBuffer kernel, ffi::AnyBuffer grad,
    ffi::Buffer<ffi::S32> group_sizes, ffi::Result<ffi::AnyBuffer> rows_grad,
    ffi::Result<ffi::AnyBuffer> kernel_grad) {
  // d rows = grouped_matmul(grad, kernel transposed); d kernel as alone.
  if (auto e = CheckGroupedMatmul(grad, kernel, group_sizes,
                                  /*transpose_kernel=*/1, *rows_grad);
      !e.success()) {
    return e;
  }
  if (auto e = CheckKernelGrad(rows, grad, group_sizes, *kernel_grad);
      !e.success()) {
    return e;
  }
  auto r = rows.dimensions();
  auto g = grad.dimensions();
  // CUTLASS: d rows = grad @ K_e^T, then dK, two grouped GEMMs on the stream.
  auto d_rows_gemm = MakeGemm(sm90::GroupedGemmOp::kRowsTimesKernelT, grad.untyped_data(),
                              kernel.untyped_data(), r[0], g[1], r[1],
                              rows_grad->untyped_data());
  auto d_kernel_gemm = MakeGemm(sm90::GroupedGemmOp::kKernelGrad, rows.untyped_data(),
                                grad.untyped_data(), r[0], r[1], g[1],
                                kernel_grad->untyped_data());
  int device;
  bool cutlass;
  if (auto e = UseCutlass(stream, rows.element_type(), group_sizes,
                          {&d_rows_gemm, &d_kernel_gemm}, &device, &cutlass);
      !e.success()) {
    return e;
  }
  if (cutlass) {
    if (auto e = RunCutlass(stream, scratch, d_rows_gemm, device); !e.success()) return e;
    return RunCutlass(stream, scratch, d_kernel_gemm, device);
  }
  cudaDataType type;
  size_t bytes;
  Segments seg;
  if (auto e = Prepare(stream, rows, group_sizes, &type, &bytes, &seg);
      !e.success()) {
    return e;
  }
  auto* d_rows = static_cast<char*>(rows_grad->untyped_data());
  auto* d_kernel = static_cast<char*>(kernel_grad->untyped_data());
  ZeroRowTail(stream, seg, r[0], r[1], g[1], bytes, d_rows);
  ZeroEmptyExperts(stream, seg, r[1] * g[1] * bytes, d_kernel);
  // d rows_e = grad_e @ K_e^T; dK_e = rows_e^T grad_e. Interleaved per
  // expert, so that the two GEMMs of one expert land on different streams.
  Problems dr, dk, p;
  AddMatmuls(seg, static_cast<const char*>(grad.untyped_data()),
             static_cast<const char*>(kernel.untyped_data()), g[1], r[1],
             /*transpose_kernel=*/true, bytes, d_rows, &dr);
  AddKernelGrads(seg, static_cast<const char*>(rows.untyped_data()),
                 static_cast<const char*>(grad.untyped_data()), r[1], g[1],
                 bytes, d_kernel, &dk);
  for (size_t i = 0; i < std::max(dr.size(), dk.size()); ++i) {
    for (const Problems* q : {&dr, &dk}) {
      if (i >= q->size()) continue;
      p.Add(q->transa[i], q->transb[i], q->m[i], q->n[i], q->k[i], q->a[i],
            q->lda[i], q->b[i], q->ldb[i], q->c[i], q->ldc[i]);
    }
  }
  return RunGemms(stream, scratch, type, p);
}

}  // namespace
}  // namespace tf_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulCuda, tf_moe::GroupedMatmulCuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b] / [E, b, a]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Attr<int64_t>("transpose_kernel")        // 0 or 1
        .Ret<xla::ffi::AnyBuffer>());             // out [N, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulBiasCuda, tf_moe::GroupedMatmulBiasCuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b]
        .Arg<xla::ffi::AnyBuffer>()               // bias [E, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Attr<int64_t>("activation")              // 0 none, 1 relu
        .Ret<xla::ffi::AnyBuffer>());             // out [N, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulKernelGradCuda, tf_moe::GroupedMatmulKernelGradCuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // grad [N, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Ret<xla::ffi::AnyBuffer>());             // kernel_grad [E, a, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulGradCuda, tf_moe::GroupedMatmulGradCuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b]
        .Arg<xla::ffi::AnyBuffer>()               // grad [N, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Ret<xla::ffi::AnyBuffer>()               // rows_grad [N, a]
        .Ret<xla::ffi::AnyBuffer>());             // kernel_grad [E, a, b]
