// CUDA kernels and typed XLA FFI handlers (platform "CUDA") for dispatch,
// combine and the combine adjoint: the same functions as dispatch_core.h.
//
// One thread block per token; threads stride over d with 16-byte vector
// loads and stores where the row allows it. Every routed choice's
// (expert, position) is checked on the device: a bad one is skipped (nothing
// is written out of bounds) and recorded (with d = 0, where those kernels do
// not run, ValidateRoutingKernel checks the choices alone). The record is
// reported in one of two ways (TF_MOE_CHECK_ROUTING, read on every call):
// - "sync" (default): the handler reads it back (one 8-byte copy and a
//   stream synchronization per call) and returns InvalidArgument with the
//   same message as the CPU handlers.
// - "deferred": a one-thread kernel copies the first bad choice into a
//   per-device record in mapped host memory, and the next dispatch/combine
//   call on that device (a host read, no synchronization) returns the
//   InvalidArgument error, once. The routers' choices are in range by
//   construction, so a training step need not stall on every call; opt-in
//   until benchmarks/gpu_correctness.py has passed with it on a GPU.
//
// Targets (JAX: jax.ffi.register_ffi_target(name, pycapsule, platform="CUDA")):
//   tf_moe_dispatch      TfMoeDispatchCuda
//   tf_moe_combine       TfMoeCombineCuda
//   tf_moe_combine_grad  TfMoeCombineGradCuda
//
// Shape letters: G groups, S tokens per group, k choices per token, E experts,
// C capacity, d model dim.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/ffi_common.h"
#include "tf_moe/ops/cc/mapped_record.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace {

constexpr unsigned long long kNoError = ~0ull;

// Row (in an [E, G, C] buffer) of choice i of token t, or -1 if the choice
// is not routed or out of range (then recorded in *error).
__device__ __forceinline__ int64_t SlotOf(const RoutingView& r, int64_t t,
                                          int64_t i,
                                          unsigned long long* error) {
  if (!r.dispatch_mask[i]) return -1;
  const int64_t e = r.expert_index[i];
  const int64_t c = r.position[i];
  if (e < 0 || e >= r.num_experts || c < 0 || c >= r.capacity) {
    if (threadIdx.x == 0) atomicMin(error, static_cast<unsigned long long>(i));
    return -1;
  }
  const int64_t g = t / r.group_size;
  return (e * r.groups + g) * r.capacity + c;
}

template <typename T>
struct Vec;  // float conversion of T.
template <>
struct Vec<float> {
  __device__ static float ToF(float v) { return v; }
  __device__ static float FromF(float v) { return v; }
};
template <>
struct Vec<__nv_bfloat16> {
  __device__ static float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 FromF(float v) { return __float2bfloat16(v); }
};
template <>
struct Vec<__half> {
  __device__ static float ToF(__half v) { return __half2float(v); }
  __device__ static __half FromF(float v) { return __float2half(v); }
};

// A chunk of N elements of T, loaded/stored as one (16 bytes when N * sizeof(T) = 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Chunk {
  T v[N];
};

// ---------------------------------------------------------------------------
// Dispatch: a plain copy of token rows (dtype-agnostic: W-byte words).

template <typename W>
__global__ void DispatchKernel(const W* __restrict__ x, RoutingView r,
                               int64_t row_words, W* __restrict__ out,
                               unsigned long long* error) {
  const int64_t t = blockIdx.x;
  int64_t slots[8];
  int num = 0;
  for (int64_t i = t * r.k; i < (t + 1) * r.k; ++i) {
    const int64_t slot = SlotOf(r, t, i, error);
    if (slot >= 0) {
      if (num == 8) {  // k > 8: flush one slot at a time
        for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) {
          out[slot * row_words + w] = x[t * row_words + w];
        }
      } else {
        slots[num++] = slot;
      }
    }
  }
  for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) {
    const W value = x[t * row_words + w];
#pragma unroll 4
    for (int n = 0; n < num; ++n) out[slots[n] * row_words + w] = value;
  }
}

// ---------------------------------------------------------------------------
// Combine: out[t] = sum_j w_j * y[slot_j], float accumulation.

template <typename T, int N>
__global__ void CombineKernel(const T* __restrict__ y, RoutingView r,
                              const float* __restrict__ weight, int64_t d,
                              T* __restrict__ out,
                              unsigned long long* error) {
  using C = Chunk<T, N>;
  const int64_t t = blockIdx.x;
  const int64_t chunks = d / N;
  for (int64_t w = threadIdx.x; w < chunks; w += blockDim.x) {
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] = 0.0f;
    for (int64_t i = t * r.k; i < (t + 1) * r.k; ++i) {
      const int64_t slot = SlotOf(r, t, i, error);
      if (slot < 0) continue;
      const float wi = weight[i];
      const C c = reinterpret_cast<const C*>(y + slot * d)[w];
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] += wi * Vec<T>::ToF(c.v[n]);
    }
    C result;
#pragma unroll
    for (int n = 0; n < N; ++n) result.v[n] = Vec<T>::FromF(acc[n]);
    reinterpret_cast<C*>(out + t * d)[w] = result;
  }
}

// ---------------------------------------------------------------------------
// Combine adjoint: dy[slot_j] = w_j * dout[t]; dw_j = <dout[t], y[slot_j]>.

__device__ __forceinline__ float BlockSum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  const int warps = (blockDim.x + 31) / 32;
  for (int i = 0; i < warps; ++i) total += shared[i];
  return total;
}

template <typename T, int N>
__global__ void CombineGradKernel(const T* __restrict__ dout,
                                  const T* __restrict__ y, RoutingView r,
                                  const float* __restrict__ weight, int64_t d,
                                  T* __restrict__ dy, float* __restrict__ dw,
                                  unsigned long long* error) {
  using C = Chunk<T, N>;
  __shared__ float shared[32];
  const int64_t t = blockIdx.x;
  const int64_t chunks = d / N;
  const C* g_row = reinterpret_cast<const C*>(dout + t * d);
  for (int64_t i = t * r.k; i < (t + 1) * r.k; ++i) {
    const int64_t slot = SlotOf(r, t, i, error);
    if (slot < 0) {
      if (threadIdx.x == 0) dw[i] = 0.0f;
      continue;
    }
    const float wi = weight[i];
    const C* y_row = reinterpret_cast<const C*>(y + slot * d);
    C* dy_row = reinterpret_cast<C*>(dy + slot * d);
    float dot = 0.0f;
    for (int64_t w = threadIdx.x; w < chunks; w += blockDim.x) {
      const C g = g_row[w];
      const C yv = y_row[w];
      C out;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float gf = Vec<T>::ToF(g.v[n]);
        dot += gf * Vec<T>::ToF(yv.v[n]);
        out.v[n] = Vec<T>::FromF(wi * gf);
      }
      dy_row[w] = out;
    }
    dot = BlockSum(dot, shared);
    if (threadIdx.x == 0) dw[i] = dot;
  }
}

// ---------------------------------------------------------------------------
// Routing check alone, for calls that move no data (d = 0): the kernels above
// then do not run, but a bad routed choice must still be an error. One
// thread per choice (grid-stride).

__global__ void ValidateRoutingKernel(RoutingView r, int64_t num_choices,
                                      unsigned long long* error) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < num_choices; i += stride) {
    if (!r.dispatch_mask[i]) continue;
    const int64_t e = r.expert_index[i];
    const int64_t c = r.position[i];
    if (e < 0 || e >= r.num_experts || c < 0 || c >= r.capacity) {
      atomicMin(error, static_cast<unsigned long long>(i));
    }
  }
}

// ---------------------------------------------------------------------------
// Launch helpers.

int ThreadsFor(int64_t units) {
  int threads = 32;
  while (threads < 256 && threads < units) threads *= 2;
  return threads;
}

ffi::Error CudaError(const char* what) {
  cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("tf_moe: CUDA error in ") + what +
                              ": " + cudaGetErrorString(status));
}

// Launches ValidateRoutingKernel over all of r's choices (none: no launch).
ffi::Error LaunchValidateRouting(const RoutingView& r, cudaStream_t stream,
                                 unsigned long long* flag) {
  const int64_t n = r.num_choices();
  if (n == 0) return ffi::Error::Success();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads,
                                           65535);
  ValidateRoutingKernel<<<blocks, kThreads, 0, stream>>>(r, n, flag);
  return CudaError("routing check launch");
}

// Scratch flag holding the first bad choice (kNoError if none).
ffi::ErrorOr<unsigned long long*> NewErrorFlag(ffi::ScratchAllocator& scratch,
                                               cudaStream_t stream) {
  auto memory = scratch.Allocate(sizeof(unsigned long long),
                                 alignof(unsigned long long));
  if (!memory.has_value()) {
    return ffi::Unexpected(
        ffi::Error::Internal("tf_moe: cannot allocate CUDA scratch memory"));
  }
  auto* flag = static_cast<unsigned long long*>(*memory);
  cudaMemsetAsync(flag, 0xff, sizeof(*flag), stream);  // kNoError
  return flag;
}

// The CPU handlers' message for bad routed choice `first` (flat index into
// [G, S, k]) holding (expert, position), of a routing shaped like r.
std::string BadChoiceMessage(int64_t first, int32_t expert, int32_t position,
                             int64_t group_size, int64_t k, int64_t num_experts,
                             int64_t capacity) {
  const bool one_true = true;
  RoutingView single{&expert, &position, &one_true, 1, 1, 1, num_experts,
                     capacity};
  std::string message = ValidateRouting(single);
  const std::string where = "[" + std::to_string(first / (k * group_size)) +
                            ", " + std::to_string((first / k) % group_size) +
                            ", " + std::to_string(first % k) + "]";
  message.replace(message.find("[0, 0, 0]"), 9, where);
  return message;
}

// Reads the flag back (synchronizes the stream); the CPU handlers' message
// for the first bad routed choice.
ffi::Error CheckErrorFlag(const unsigned long long* flag, const RoutingView& r,
                          cudaStream_t stream) {
  unsigned long long first = kNoError;
  cudaMemcpyAsync(&first, flag, sizeof(first), cudaMemcpyDeviceToHost, stream);
  cudaStreamSynchronize(stream);
  if (auto e = CudaError("kernel"); !e.success()) return e;
  if (first == kNoError) return ffi::Error::Success();
  // Rebuild the message on the host from that one choice.
  int32_t e_value, c_value;
  cudaMemcpy(&e_value, r.expert_index + first, sizeof(int32_t),
             cudaMemcpyDeviceToHost);
  cudaMemcpy(&c_value, r.position + first, sizeof(int32_t),
             cudaMemcpyDeviceToHost);
  return ffi::Error::InvalidArgument(
      "tf_moe: " + BadChoiceMessage(static_cast<int64_t>(first), e_value, c_value,
                                    r.group_size, r.k, r.num_experts, r.capacity));
}

// --- deferred checks (TF_MOE_CHECK_ROUTING=deferred) --------------------------

bool DeferredChecks() {
  const char* mode = std::getenv("TF_MOE_CHECK_ROUTING");
  return mode != nullptr && std::strcmp(mode, "deferred") == 0;
}

// The first bad choice of an earlier call, in mapped host memory.
struct BadChoiceRecord {
  int set;  // written last
  int32_t expert, position;
  int64_t index, group_size, k, num_experts, capacity;
};

// Copies this call's first bad choice (if any, and if none is pending) into
// the record.
__global__ void RecordBadChoice(const unsigned long long* flag, RoutingView r,
                                BadChoiceRecord* record) {
  const unsigned long long first = *flag;
  volatile BadChoiceRecord* out = record;
  if (first == kNoError || out->set) return;
  out->index = static_cast<int64_t>(first);
  out->expert = r.expert_index[first];
  out->position = r.position[first];
  out->group_size = r.group_size;
  out->k = r.k;
  out->num_experts = r.num_experts;
  out->capacity = r.capacity;
  __threadfence_system();
  out->set = 1;
}

// At the start of a deferred-check call: the error of an earlier call's bad
// choice, once.
ffi::Error ReportEarlierBadChoice(bool deferred) {
  if (!deferred) return ffi::Error::Success();
  BadChoiceRecord *host, *dev;
  if (auto e = MappedRecordFor(&host, &dev); !e.success()) return e;
  volatile BadChoiceRecord* record = host;
  if (record->set == 0) return ffi::Error::Success();
  const std::string message = BadChoiceMessage(
      record->index, record->expert, record->position, record->group_size,
      record->k, record->num_experts, record->capacity);
  record->set = 0;
  return ffi::Error::InvalidArgument(
      "tf_moe: an earlier dispatch/combine call on this GPU had a bad routed "
      "choice (skipped: its rows were left 0): " + message +
      " (TF_MOE_CHECK_ROUTING=sync stops at that call)");
}

// At the end of a call: the synchronous check, or the deferred record.
ffi::Error FinishCheck(const unsigned long long* flag, const RoutingView& r,
                       cudaStream_t stream, bool deferred) {
  if (!deferred) return CheckErrorFlag(flag, r, stream);
  BadChoiceRecord *host, *dev;
  if (auto e = MappedRecordFor(&host, &dev); !e.success()) return e;
  RecordBadChoice<<<1, 1, 0, stream>>>(flag, r, dev);
  return CudaError("routing record launch");
}

// Calls fn(T{}, N) for the buffer dtype's CUDA type and vector width.
template <typename Fn>
ffi::Error DispatchCudaType(ffi::DataType dtype, int64_t d, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return d % 4 == 0 ? fn(float{}, std::integral_constant<int, 4>{})
                        : fn(float{}, std::integral_constant<int, 1>{});
    case ffi::DataType::BF16:
      return d % 8 == 0 ? fn(__nv_bfloat16{}, std::integral_constant<int, 8>{})
                        : fn(__nv_bfloat16{}, std::integral_constant<int, 1>{});
    case ffi::DataType::F16:
      return d % 8 == 0 ? fn(__half{}, std::integral_constant<int, 8>{})
                        : fn(__half{}, std::integral_constant<int, 1>{});
    default:
      return ffi::Error::InvalidArgument(
          "tf_moe: unsupported dtype (float32, bfloat16 and float16 are "
          "supported).");
  }
}

// ---------------------------------------------------------------------------
// Handlers.

ffi::Error DispatchCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer x, IndexBuffer expert_index,
                        IndexBuffer position, MaskBuffer dispatch_mask,
                        int64_t num_experts, int64_t capacity,
                        ffi::Result<ffi::AnyBuffer> out) {
  RoutingView r;
  int64_t d;
  if (auto e = ValidateDispatch(x, expert_index, position, dispatch_mask,
                                num_experts, capacity, *out, &r, &d);
      !e.success()) {
    return e;
  }
  const bool deferred = DeferredChecks();  // one decision for the call
  if (auto e = ReportEarlierBadChoice(deferred); !e.success()) return e;
  auto flag = NewErrorFlag(scratch, stream);
  if (flag.has_error()) return flag.error();
  cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream);
  const int64_t tokens = r.groups * r.group_size;
  const int64_t row_bytes = d * ffi::ByteWidth(x.element_type());
  if (tokens > 0 && row_bytes > 0) {
    auto launch = [&](auto word) {
      using W = decltype(word);
      const int64_t words = row_bytes / sizeof(W);
      DispatchKernel<W><<<tokens, ThreadsFor(words), 0, stream>>>(
          static_cast<const W*>(x.untyped_data()), r, words,
          static_cast<W*>(out->untyped_data()), *flag);
    };
    if (row_bytes % 16 == 0) {
      launch(uint4{});
    } else if (row_bytes % 4 == 0) {
      launch(uint32_t{});
    } else {
      launch(uint16_t{});
    }
  } else if (auto e = LaunchValidateRouting(r, stream, *flag); !e.success()) {
    return e;
  }
  if (auto e = CudaError("dispatch launch"); !e.success()) return e;
  return FinishCheck(*flag, r, stream, deferred);
}

ffi::Error CombineCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                       ffi::AnyBuffer expert_outputs, IndexBuffer expert_index,
                       IndexBuffer position, MaskBuffer dispatch_mask,
                       WeightBuffer combine_weight, int64_t num_experts,
                       int64_t capacity, ffi::Result<ffi::AnyBuffer> out) {
  RoutingView r;
  int64_t d;
  if (auto e = ValidateCombine(expert_outputs, expert_index, position,
                               dispatch_mask, combine_weight, num_experts,
                               capacity, *out, &r, &d);
      !e.success()) {
    return e;
  }
  const bool deferred = DeferredChecks();  // one decision for the call
  if (auto e = ReportEarlierBadChoice(deferred); !e.success()) return e;
  auto flag = NewErrorFlag(scratch, stream);
  if (flag.has_error()) return flag.error();
  const int64_t tokens = r.groups * r.group_size;
  if (tokens > 0 && d > 0) {
    auto status = DispatchCudaType(
        expert_outputs.element_type(), d, [&](auto t, auto n) {
          using T = decltype(t);
          constexpr int N = decltype(n)::value;
          CombineKernel<T, N><<<tokens, ThreadsFor(d / N), 0, stream>>>(
              static_cast<const T*>(expert_outputs.untyped_data()),
              r, combine_weight.typed_data(), d,
              static_cast<T*>(out->untyped_data()), *flag);
          return CudaError("combine launch");
        });
    if (!status.success()) return status;
  } else if (auto e = LaunchValidateRouting(r, stream, *flag); !e.success()) {
    return e;
  }
  return FinishCheck(*flag, r, stream, deferred);
}

ffi::Error CombineGradCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                           ffi::AnyBuffer grad_output,
                           ffi::AnyBuffer expert_outputs,
                           IndexBuffer expert_index, IndexBuffer position,
                           MaskBuffer dispatch_mask,
                           WeightBuffer combine_weight, int64_t num_experts,
                           int64_t capacity,
                           ffi::Result<ffi::AnyBuffer> grad_expert_outputs,
                           ffi::Result<WeightBuffer> grad_combine_weight) {
  RoutingView r;
  int64_t d;
  if (auto e = ValidateCombineGrad(grad_output, expert_outputs, expert_index,
                                   position, dispatch_mask, combine_weight,
                                   num_experts, capacity, *grad_expert_outputs,
                                   *grad_combine_weight, &r, &d);
      !e.success()) {
    return e;
  }
  const bool deferred = DeferredChecks();  // one decision for the call
  if (auto e = ReportEarlierBadChoice(deferred); !e.success()) return e;
  auto flag = NewErrorFlag(scratch, stream);
  if (flag.has_error()) return flag.error();
  cudaMemsetAsync(grad_expert_outputs->untyped_data(), 0,
                  grad_expert_outputs->size_bytes(), stream);
  cudaMemsetAsync(grad_combine_weight->typed_data(), 0,
                  grad_combine_weight->size_bytes(), stream);
  const int64_t tokens = r.groups * r.group_size;
  if (tokens > 0 && d > 0) {
    auto status = DispatchCudaType(
        expert_outputs.element_type(), d, [&](auto t, auto n) {
          using T = decltype(t);
          constexpr int N = decltype(n)::value;
          CombineGradKernel<T, N><<<tokens, ThreadsFor(d / N), 0, stream>>>(
              static_cast<const T*>(grad_output.untyped_data()),
              static_cast<const T*>(expert_outputs.untyped_data()),
              r, combine_weight.typed_data(), d,
              static_cast<T*>(grad_expert_outputs->untyped_data()),
              grad_combine_weight->typed_data(), *flag);
          return CudaError("combine_grad launch");
        });
    if (!status.success()) return status;
  } else if (auto e = LaunchValidateRouting(r, stream, *flag); !e.success()) {
    return e;
  }
  return FinishCheck(*flag, r, stream, deferred);
}

// FFI binding: the context (stream, scratch memory), then the op's
// arguments (ffi_common.h).
auto BindCuda() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::ScratchAllocator>();
}

}  // namespace
}  // namespace tf_moe

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeDispatchCuda, tf_moe::DispatchCuda,
                              tf_moe::BindDispatch(tf_moe::BindCuda()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeCombineCuda, tf_moe::CombineCuda,
                              tf_moe::BindCombine(tf_moe::BindCuda()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeCombineGradCuda, tf_moe::CombineGradCuda,
                              tf_moe::BindCombineGrad(tf_moe::BindCuda()));
