// Argument checks, dtype dispatch and FFI signatures shared by the CPU
// (ffi_handlers.cc) and CUDA (dispatch_kernels.cu.cc) XLA FFI handlers.
// Compiled against the XLA FFI C API 0.2 headers that TensorFlow ships (see
// third_party/tensorflow).

#ifndef TF_MOE_OPS_CC_FFI_COMMON_H_
#define TF_MOE_OPS_CC_FFI_COMMON_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

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
// kernels) from the routing buffers; checks the attributes num_experts and
// capacity (ValidateRoutingAttrs) and that the routing shapes agree.
inline ffi::Error MakeRoutingView(const IndexBuffer& expert_index,
                                  const IndexBuffer& position,
                                  const MaskBuffer& dispatch_mask,
                                  int64_t num_experts, int64_t capacity,
                                  RoutingView* r) {
  if (std::string message = ValidateRoutingAttrs(num_experts, capacity);
      !message.empty()) {
    return ffi::Error::InvalidArgument("tf_moe: " + message);
  }
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

// Checks a combine weight (or its gradient) is [G, S, k].
inline ffi::Error CheckWeightShape(const RoutingView& r,
                                   ffi::Span<const int64_t> dims) {
  if (DimsEqual(dims, {r.groups, r.group_size, r.k})) {
    return ffi::Error::Success();
  }
  return ShapeError("combine_weight", dims, {r.groups, r.group_size, r.k});
}

// Argument checks of each op, shared by its CPU and CUDA handlers: buffer
// shapes, dtypes, E and C. Each fills `r` and `d`; the routed index values
// are checked by the handler (CPU: ValidateRouting, CUDA: on the device).

inline ffi::Error ValidateDispatch(const ffi::AnyBuffer& x,
                                   const IndexBuffer& expert_index,
                                   const IndexBuffer& position,
                                   const MaskBuffer& dispatch_mask,
                                   int64_t num_experts, int64_t capacity,
                                   const ffi::AnyBuffer& out, RoutingView* r,
                                   int64_t* d) {
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, r);
      !e.success()) {
    return e;
  }
  return CheckDataShapes(*r, x, "x", out, "output", d);
}

inline ffi::Error ValidateCombine(const ffi::AnyBuffer& expert_outputs,
                                  const IndexBuffer& expert_index,
                                  const IndexBuffer& position,
                                  const MaskBuffer& dispatch_mask,
                                  const WeightBuffer& combine_weight,
                                  int64_t num_experts, int64_t capacity,
                                  const ffi::AnyBuffer& out, RoutingView* r,
                                  int64_t* d) {
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, r);
      !e.success()) {
    return e;
  }
  if (auto e = CheckWeightShape(*r, combine_weight.dimensions());
      !e.success()) {
    return e;
  }
  return CheckDataShapes(*r, out, "output", expert_outputs, "expert_outputs",
                         d);
}

inline ffi::Error ValidateCombineGrad(
    const ffi::AnyBuffer& grad_output, const ffi::AnyBuffer& expert_outputs,
    const IndexBuffer& expert_index, const IndexBuffer& position,
    const MaskBuffer& dispatch_mask, const WeightBuffer& combine_weight,
    int64_t num_experts, int64_t capacity,
    const ffi::AnyBuffer& grad_expert_outputs,
    const WeightBuffer& grad_combine_weight, RoutingView* r, int64_t* d) {
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, r);
      !e.success()) {
    return e;
  }
  for (const WeightBuffer* weight : {&combine_weight, &grad_combine_weight}) {
    if (auto e = CheckWeightShape(*r, weight->dimensions()); !e.success()) {
      return e;
    }
  }
  if (auto e = CheckDataShapes(*r, grad_output, "grad_output", expert_outputs,
                               "expert_outputs", d);
      !e.success()) {
    return e;
  }
  return CheckDataShapes(*r, grad_output, "grad_output", grad_expert_outputs,
                         "grad_expert_outputs", d);
}

// Each op's FFI signature after the platform's context arguments, for
// XLA_FFI_DEFINE_HANDLER_SYMBOL: one list for the CPU and CUDA handlers.
// Shape letters: G groups, S tokens per group, k choices per token, E experts,
// C capacity, d model dim.

template <typename Binding>
auto BindDispatch(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // x [G, S, d]
      .template Arg<IndexBuffer>()      // expert_index [G, S, k]
      .template Arg<IndexBuffer>()      // position [G, S, k]
      .template Arg<MaskBuffer>()       // dispatch_mask [G, S, k]
      .template Attr<int64_t>("num_experts")  // E
      .template Attr<int64_t>("capacity")  // C
      .template Ret<ffi::AnyBuffer>();  // expert_inputs [E, G, C, d]
}

template <typename Binding>
auto BindCombine(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // expert_outputs [E, G, C, d]
      .template Arg<IndexBuffer>()      // expert_index [G, S, k]
      .template Arg<IndexBuffer>()      // position [G, S, k]
      .template Arg<MaskBuffer>()       // dispatch_mask [G, S, k]
      .template Arg<WeightBuffer>()     // combine_weight <f32>[G, S, k]
      .template Attr<int64_t>("num_experts")  // E
      .template Attr<int64_t>("capacity")  // C
      .template Ret<ffi::AnyBuffer>();  // outputs [G, S, d]
}

template <typename Binding>
auto BindCombineGrad(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // grad_output [G, S, d]
      .template Arg<ffi::AnyBuffer>()   // expert_outputs [E, G, C, d]
      .template Arg<IndexBuffer>()      // expert_index [G, S, k]
      .template Arg<IndexBuffer>()      // position [G, S, k]
      .template Arg<MaskBuffer>()       // dispatch_mask [G, S, k]
      .template Arg<WeightBuffer>()     // combine_weight <f32>[G, S, k]
      .template Attr<int64_t>("num_experts")  // E
      .template Attr<int64_t>("capacity")  // C
      .template Ret<ffi::AnyBuffer>()   // grad_expert_outputs [E, G, C, d]
      .template Ret<WeightBuffer>();    // grad_combine_weight <f32>[G, S, k]
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_FFI_COMMON_H_
