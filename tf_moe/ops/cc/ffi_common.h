// Shape checks and dtype dispatch shared by the CPU (ffi_handlers.cc) and
// CUDA (ffi_handlers_cuda.cu.cc) XLA FFI handlers. Compiled against the XLA
// FFI C API 0.2 headers that TensorFlow ships (see third_party/tensorflow).

#ifndef TF_MOE_OPS_CC_FFI_COMMON_H_
#define TF_MOE_OPS_CC_FFI_COMMON_H_

#include <cstdint>
#include <string>

#include "tf_moe/ops/cc/dispatch_core.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace ffi = ::xla::ffi;

using IndexBuffer = ffi::Buffer<ffi::S32>;
using MaskBuffer = ffi::Buffer<ffi::PRED>;
using WeightBuffer = ffi::Buffer<ffi::F32>;

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

inline bool DimsEqual(ffi::Span<const int64_t> a,
                      std::initializer_list<int64_t> b) {
  if (a.size() != b.size()) return false;
  size_t i = 0;
  for (int64_t v : b) {
    if (a[i++] != v) return false;
  }
  return true;
}

inline ffi::Error ShapeError(const char* what, ffi::Span<const int64_t> got,
                             std::initializer_list<int64_t> want) {
  std::string w = "[";
  size_t i = 0;
  for (int64_t v : want) w += (i++ ? ", " : "") + std::to_string(v);
  return ffi::Error::InvalidArgument(std::string("tf_moe: `") + what +
                                     "` must have shape " + w + "]. Received: " +
                                     DimsToString(got));
}

// Fills `r` (pointers and sizes, not index values: those are checked by the
// kernels) from the routing buffers; checks their shapes agree.
inline ffi::Error MakeRoutingView(const IndexBuffer& expert_index,
                                  const IndexBuffer& position,
                                  const MaskBuffer& dispatch_mask,
                                  int64_t num_experts, int64_t capacity,
                                  RoutingView* r) {
  auto dims = expert_index.dimensions();
  if (dims.size() != 3) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `expert_index` must have rank 3 [G, S, k]. Received: " +
        DimsToString(dims));
  }
  if (!DimsEqual(position.dimensions(), {dims[0], dims[1], dims[2]})) {
    return ShapeError("position", position.dimensions(),
                      {dims[0], dims[1], dims[2]});
  }
  if (!DimsEqual(dispatch_mask.dimensions(), {dims[0], dims[1], dims[2]})) {
    return ShapeError("dispatch_mask", dispatch_mask.dimensions(),
                      {dims[0], dims[1], dims[2]});
  }
  if (num_experts < 1 || capacity < 1) {
    return ffi::Error::InvalidArgument(
        "tf_moe: `num_experts` and `capacity` must be >= 1. Received: "
        "num_experts=" + std::to_string(num_experts) +
        ", capacity=" + std::to_string(capacity));
  }
  r->expert_index = expert_index.typed_data();
  r->position = position.typed_data();
  r->dispatch_mask = dispatch_mask.typed_data();
  r->groups = dims[0];
  r->group_size = dims[1];
  r->k = dims[2];
  r->num_experts = num_experts;
  r->capacity = capacity;
  return ffi::Error::Success();
}

// Calls fn(T{}) with T = float, bf16_t or f16_t for the buffer's dtype.
template <typename Fn>
ffi::Error DispatchFloatType(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return fn(float{});
    case ffi::DataType::BF16:
      return fn(bf16_t{});
    case ffi::DataType::F16:
      return fn(f16_t{});
    default:
      return ffi::Error::InvalidArgument(
          "tf_moe: unsupported dtype (float32, bfloat16 and float16 are "
          "supported). Received: XLA FFI dtype " +
          std::to_string(static_cast<int>(dtype)));
  }
}

// Checks the data shapes of one call: tokens [G, S, d] and expert buffers
// [E, G, C, d] with the routing's G, S, E, C and the same dtype.
inline ffi::Error CheckDataShapes(const RoutingView& r,
                                  const ffi::AnyBuffer& tokens,
                                  const char* tokens_name,
                                  const ffi::AnyBuffer& experts,
                                  const char* experts_name, int64_t* d) {
  auto t = tokens.dimensions();
  if (t.size() != 3) {
    return ffi::Error::InvalidArgument(
        std::string("tf_moe: `") + tokens_name +
        "` must have rank 3 [G, S, d]. Received: " + DimsToString(t));
  }
  *d = t[2];
  if (!DimsEqual(t, {r.groups, r.group_size, *d})) {
    return ShapeError(tokens_name, t, {r.groups, r.group_size, *d});
  }
  if (!DimsEqual(experts.dimensions(),
                 {r.num_experts, r.groups, r.capacity, *d})) {
    return ShapeError(experts_name, experts.dimensions(),
                      {r.num_experts, r.groups, r.capacity, *d});
  }
  if (tokens.element_type() != experts.element_type()) {
    return ffi::Error::InvalidArgument(
        std::string("tf_moe: `") + tokens_name + "` and `" + experts_name +
        "` must have the same dtype.");
  }
  return ffi::Error::Success();
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_FFI_COMMON_H_
