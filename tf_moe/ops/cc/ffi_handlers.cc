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
  int64_t d;
  if (auto e = ValidateDispatch(x, expert_index, position, dispatch_mask,
                                num_experts, capacity, *out, &r, &d);
      !e.success()) {
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
  int64_t d;
  if (auto e = ValidateCombine(expert_outputs, expert_index, position,
                               dispatch_mask, combine_weight, num_experts,
                               capacity, *out, &r, &d);
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
  int64_t d;
  if (auto e = ValidateCombineGrad(grad_output, expert_outputs, expert_index,
                                   position, dispatch_mask, combine_weight,
                                   num_experts, capacity, *grad_expert_outputs,
                                   *grad_combine_weight, &r, &d);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeDispatchHost, tf_moe::DispatchHost,
                              tf_moe::BindDispatch(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeCombineHost, tf_moe::CombineHost,
                              tf_moe::BindCombine(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfMoeCombineGradHost, tf_moe::CombineGradHost,
                              tf_moe::BindCombineGrad(ffi::Ffi::Bind()));
