// Shared by the TensorFlow op libraries (tf_moe/ops/cc/tf_ops.cc and
// tf_moe/ops/cc_dropless/tf_ops.cc): registering typed XLA FFI handlers into
// TensorFlow's own XLA, and viewing TF tensors as the cores' storage types.

#ifndef TF_MOE_OPS_CC_TF_OP_SUPPORT_H_
#define TF_MOE_OPS_CC_TF_OP_SUPPORT_H_

#include <cstring>
#include <initializer_list>

#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/logging.h"
#include "tf_moe/ops/cc/dispatch_core.h"
#include "xla/ffi/api/c_api.h"

// Exported by libtensorflow_framework.so.2: TF's own XLA FFI API.
extern "C" const XLA_FFI_Api* XLA_FFI_GetApi();

namespace tf_moe {

struct FfiTarget {
  const char* name;
  XLA_FFI_Handler* handler;
};

// Registers CPU (platform "Host") FFI handlers into TF's XLA; logs a warning
// and returns false for a target that cannot be registered. Call it from a
// static initializer of the op library, so that the handlers exist before
// the first jit_compile=True call that lowers to them.
inline bool RegisterHostFfiHandlers(std::initializer_list<FfiTarget> targets) {
  const XLA_FFI_Api* api = XLA_FFI_GetApi();
  static const char kPlatform[] = "Host";
  bool ok = true;
  for (const FfiTarget& target : targets) {
    XLA_FFI_Handler_Register_Args args;
    args.struct_size = XLA_FFI_Handler_Register_Args_STRUCT_SIZE;
    args.extension_start = nullptr;
    args.name = XLA_FFI_ByteSpan{target.name, std::strlen(target.name)};
    args.platform = XLA_FFI_ByteSpan{kPlatform, sizeof(kPlatform) - 1};
    args.bundle = XLA_FFI_Handler_Bundle{nullptr, nullptr, nullptr,
                                         target.handler};
    args.traits = 0;
    if (XLA_FFI_Error* error = api->XLA_FFI_Handler_Register(&args)) {
      XLA_FFI_Error_GetMessage_Args message;
      message.struct_size = XLA_FFI_Error_GetMessage_Args_STRUCT_SIZE;
      message.extension_start = nullptr;
      message.error = error;
      api->XLA_FFI_Error_GetMessage(&message);
      LOG(WARNING) << "tf_moe: could not register XLA FFI handler "
                   << target.name << ": " << message.message;
      XLA_FFI_Error_Destroy_Args destroy;
      destroy.struct_size = XLA_FFI_Error_Destroy_Args_STRUCT_SIZE;
      destroy.extension_start = nullptr;
      destroy.error = error;
      api->XLA_FFI_Error_Destroy(&destroy);
      ok = false;
    }
  }
  return ok;
}

// The core's storage type of a TF element type (same bits).
template <typename T>
struct CoreType;
template <>
struct CoreType<float> {
  using type = float;
};
template <>
struct CoreType<Eigen::bfloat16> {
  using type = bf16_t;
};
template <>
struct CoreType<Eigen::half> {
  using type = f16_t;
};

template <typename T>
const typename CoreType<T>::type* Data(const tensorflow::Tensor& t) {
  return reinterpret_cast<const typename CoreType<T>::type*>(
      t.flat<T>().data());
}
template <typename T>
typename CoreType<T>::type* MutableData(tensorflow::Tensor* t) {
  return reinterpret_cast<typename CoreType<T>::type*>(t->flat<T>().data());
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_TF_OP_SUPPORT_H_
