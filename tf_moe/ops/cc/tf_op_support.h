// Shared by the TensorFlow op libraries (tf_moe/ops/cc/tf_ops.cc and
// tf_moe/ops/cc_dropless/tf_ops.cc): registering typed XLA FFI handlers into
// TensorFlow's own XLA, viewing TF tensors as the cores' storage types, and
// building output shapes that are checked first (TensorShape and XLA's
// ShapeUtil::MakeShape abort the process on a size that overflows int64).

#ifndef TF_MOE_OPS_CC_TF_OP_SUPPORT_H_
#define TF_MOE_OPS_CC_TF_OP_SUPPORT_H_

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/logging.h"
#include "tf_moe/ops/cc/dispatch_core.h"
#include "xla/ffi/api/c_api.h"
#include "xla/shape.h"
#include "xla/shape_util.h"

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

// Status of a framework-free check's message (empty: OK).
inline absl::Status CheckStatus(const std::string& message) {
  if (message.empty()) return absl::OkStatus();
  return tensorflow::errors::InvalidArgument("tf_moe: ", message);
}

inline std::vector<int64_t> DimValues(std::initializer_list<NamedDim> dims) {
  std::vector<int64_t> values;
  for (const NamedDim& dim : dims) values.push_back(dim.value);
  return values;
}

// The TensorShape `dims` of output `name` with elements of `dtype`, or
// InvalidArgument naming the dimensions where it cannot exist
// (CheckBufferSize).
inline absl::Status CheckedTensorShape(const char* name,
                                       std::initializer_list<NamedDim> dims,
                                       tensorflow::DataType dtype,
                                       tensorflow::TensorShape* shape) {
  TF_RETURN_IF_ERROR(CheckStatus(
      CheckBufferSize(name, dims, tensorflow::DataTypeSize(dtype))));
  return tensorflow::TensorShape::BuildTensorShape(DimValues(dims), shape);
}

// Shape functions: sets output `index` (`name`) to shape `dims`, where a
// dimension is -1 if unknown; if all are known, first checks a buffer of
// them and elements of the type attribute `dtype_attr` can exist.
inline absl::Status SetCheckedOutput(
    tensorflow::shape_inference::InferenceContext* c, int index,
    const char* name, std::initializer_list<NamedDim> dims,
    const char* dtype_attr) {
  std::vector<tensorflow::shape_inference::DimensionHandle> handles;
  bool known = true;
  for (const NamedDim& dim : dims) {
    known = known && dim.value >= 0;
    handles.push_back(dim.value >= 0 ? c->MakeDim(dim.value)
                                     : c->UnknownDim());
  }
  if (known) {
    tensorflow::DataType dtype;
    TF_RETURN_IF_ERROR(c->GetAttr(dtype_attr, &dtype));
    TF_RETURN_IF_ERROR(CheckStatus(
        CheckBufferSize(name, dims, tensorflow::DataTypeSize(dtype))));
  }
  c->set_output(index, c->MakeShape(handles));
  return absl::OkStatus();
}

// CheckedTensorShape for an XLA array shape of element type `type`.
inline absl::Status CheckedXlaShape(const char* name,
                                    std::initializer_list<NamedDim> dims,
                                    xla::PrimitiveType type,
                                    xla::Shape* shape) {
  TF_RETURN_IF_ERROR(CheckStatus(CheckBufferSize(
      name, dims, xla::ShapeUtil::ByteSizeOfPrimitiveType(type))));
  absl::StatusOr<xla::Shape> made =
      xla::ShapeUtil::MakeValidatedShape(type, DimValues(dims));
  if (!made.ok()) return made.status();
  *shape = *std::move(made);
  return absl::OkStatus();
}

// Whether an XLA result (an array, or a tuple of them) has an array of no
// elements. XLA replaces an instruction without side effects whose result
// has no elements by a constant (ZeroSizedHloElimination), so a custom call
// with such a result would never run, nor its argument checks: the lowerings
// mark those calls as having side effects.
inline bool HasZeroElementArray(const xla::Shape& shape) {
  if (shape.IsTuple()) {
    for (const xla::Shape& element : shape.tuple_shapes()) {
      if (HasZeroElementArray(element)) return true;
    }
    return false;
  }
  return shape.IsArray() && xla::ShapeUtil::IsZeroElementArray(shape);
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
