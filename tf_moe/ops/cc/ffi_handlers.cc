// Typed XLA FFI handlers (CPU platform "Host") for dispatch, combine and the
// combine adjoint. Dtype dispatch and binding only; the math is in
// dispatch_core.h.
//
// Targets (JAX: jax.ffi.register_ffi_target(name, pycapsule, platform="cpu");
// TF: registered by tf_ops.cc into TF's own XLA):
//   tf_moe_dispatch      TfMoeDispatchHost
//   tf_moe_combine       TfMoeCombineHost
//   tf_moe_combine_grad  TfMoeCombineGradHost

#include "tf_moe/ops/cc/ffi_handlers.h"

#include <string>

#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace {

ffi::Error RoutingError(const RoutingView& r) {
  std::string message = ValidateRouting(r);
  if (message.empty()) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("tf_moe: " + message);
}

ffi::Error DispatchHost(ffi::AnyBuffer x, IndexBuffer expert_index,
                        IndexBuffer position, MaskBuffer dispatch_mask,
                        int64_t num_experts, int64_t capacity,
                        ffi::Result<ffi::AnyBuffer> out) {
  RoutingView r;
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, &r);
      !e.success()) {
    return e;
  }
  int64_t d;
  if (auto e = CheckDataShapes(r, x, "x", *out, "output", &d); !e.success()) {
    return e;
  }
  if (auto e = RoutingError(r); !e.success()) return e;
  return DispatchFloatType(x.element_type(), [&](auto t) {
    using T = decltype(t);
    Dispatch<T>(static_cast<const T*>(x.untyped_data()), r, d,
                static_cast<T*>(out->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error CombineHost(ffi::AnyBuffer expert_outputs, IndexBuffer expert_index,
                       IndexBuffer position, MaskBuffer dispatch_mask,
                       WeightBuffer combine_weight, int64_t num_experts,
                       int64_t capacity, ffi::Result<ffi::AnyBuffer> out) {
  RoutingView r;
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, &r);
      !e.success()) {
    return e;
  }
  if (!DimsEqual(combine_weight.dimensions(), {r.groups, r.group_size, r.k})) {
    return ShapeError("combine_weight", combine_weight.dimensions(),
                      {r.groups, r.group_size, r.k});
  }
  int64_t d;
  if (auto e = CheckDataShapes(r, *out, "output", expert_outputs,
                               "expert_outputs", &d);
      !e.success()) {
    return e;
  }
  if (auto e = RoutingError(r); !e.success()) return e;
  return DispatchFloatType(expert_outputs.element_type(), [&](auto t) {
    using T = decltype(t);
    Combine<T>(static_cast<const T*>(expert_outputs.untyped_data()), r,
               combine_weight.typed_data(), d,
               static_cast<T*>(out->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error CombineGradHost(ffi::AnyBuffer grad_output,
                           ffi::AnyBuffer expert_outputs,
                           IndexBuffer expert_index, IndexBuffer position,
                           MaskBuffer dispatch_mask,
                           WeightBuffer combine_weight, int64_t num_experts,
                           int64_t capacity,
                           ffi::Result<ffi::AnyBuffer> grad_expert_outputs,
                           ffi::Result<WeightBuffer> grad_combine_weight) {
  RoutingView r;
  if (auto e = MakeRoutingView(expert_index, position, dispatch_mask,
                               num_experts, capacity, &r);
      !e.success()) {
    return e;
  }
  for (auto dims : {combine_weight.dimensions(),
                    grad_combine_weight->dimensions()}) {
    if (!DimsEqual(dims, {r.groups, r.group_size, r.k})) {
      return ShapeError("combine_weight", dims, {r.groups, r.group_size, r.k});
    }
  }
  int64_t d;
  if (auto e = CheckDataShapes(r, grad_output, "grad_output", expert_outputs,
                               "expert_outputs", &d);
      !e.success()) {
    return e;
  }
  if (auto e = CheckDataShapes(r, grad_output, "grad_output",
                               *grad_expert_outputs, "grad_expert_outputs", &d);
      !e.success()) {
    return e;
  }
  if (auto e = RoutingError(r); !e.success()) return e;
  return DispatchFloatType(expert_outputs.element_type(), [&](auto t) {
    using T = decltype(t);
    CombineGrad<T>(static_cast<const T*>(grad_output.untyped_data()),
                   static_cast<const T*>(expert_outputs.untyped_data()), r,
                   combine_weight.typed_data(), d,
                   static_cast<T*>(grad_expert_outputs->untyped_data()),
                   grad_combine_weight->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace tf_moe

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeDispatchHost, tf_moe::DispatchHost,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()             // x [G, S, d]
        .Arg<tf_moe::IndexBuffer>()        // expert_index [G, S, k]
        .Arg<tf_moe::IndexBuffer>()        // position [G, S, k]
        .Arg<tf_moe::MaskBuffer>()         // dispatch_mask [G, S, k]
        .Attr<int64_t>("num_experts")      // E
        .Attr<int64_t>("capacity")         // C
        .Ret<ffi::AnyBuffer>());           // expert_inputs [E, G, C, d]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeCombineHost, tf_moe::CombineHost,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()             // expert_outputs [E, G, C, d]
        .Arg<tf_moe::IndexBuffer>()        // expert_index [G, S, k]
        .Arg<tf_moe::IndexBuffer>()        // position [G, S, k]
        .Arg<tf_moe::MaskBuffer>()         // dispatch_mask [G, S, k]
        .Arg<tf_moe::WeightBuffer>()       // combine_weight <f32>[G, S, k]
        .Attr<int64_t>("num_experts")      // E
        .Attr<int64_t>("capacity")         // C
        .Ret<ffi::AnyBuffer>());           // outputs [G, S, d]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeCombineGradHost, tf_moe::CombineGradHost,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()             // grad_output [G, S, d]
        .Arg<ffi::AnyBuffer>()             // expert_outputs [E, G, C, d]
        .Arg<tf_moe::IndexBuffer>()        // expert_index [G, S, k]
        .Arg<tf_moe::IndexBuffer>()        // position [G, S, k]
        .Arg<tf_moe::MaskBuffer>()         // dispatch_mask [G, S, k]
        .Arg<tf_moe::WeightBuffer>()       // combine_weight <f32>[G, S, k]
        .Attr<int64_t>("num_experts")      // E
        .Attr<int64_t>("capacity")         // C
        .Ret<ffi::AnyBuffer>()             // grad_expert_outputs [E, G, C, d]
        .Ret<tf_moe::WeightBuffer>());     // grad_combine_weight <f32>[G, S, k]
