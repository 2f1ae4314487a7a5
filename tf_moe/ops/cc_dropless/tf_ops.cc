// TensorFlow ops for the dropless grouped matmul: REGISTER_OP, CPU kernels
// (eager and graph mode), and XLA lowerings (jit_compile=True) to the typed
// XLA FFI handlers of grouped_matmul_ffi.cc, which a static initializer here
// registers into TensorFlow's own XLA (platform "Host"). Same pattern as
// tf_moe/ops/cc/tf_ops.cc (dispatch/combine); the FFI target names differ, so
// both libraries can be loaded in one process.
//
//   TfMoeGroupedMatmul            rows [N, a], kernel [E, a, b] ([E, b, a]
//                                 with transpose_kernel), group_sizes
//                                 <int32>[E] -> out [N, b]
//   TfMoeGroupedMatmulKernelGrad  rows [N, a], grad [N, b], group_sizes
//                                 <int32>[E] -> kernel_grad [E, a, b]
//
// Expert e's segment is rows [start_e, start_e + group_sizes[e]), start_e =
// sum of the earlier sizes; rows at or past sum(group_sizes) give 0. Gradients
// are registered in Python (tf_moe/ops/grouped_matmul.py). Math:
// grouped_matmul_core.h.
//
// Shape letters: N rows, a input dim, b output dim, E experts.

#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/logging.h"
#include "tensorflow/core/platform/threadpool.h"
#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/tf_op_support.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_checks.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_core.h"
#include "xla/ffi/api/c_api.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/shape_util.h"

// The XLA FFI handlers of grouped_matmul_ffi.cc (linked into this library).
extern "C" {
XLA_FFI_Error* TfMoeGroupedMatmulHost(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* TfMoeGroupedMatmulKernelGradHost(XLA_FFI_CallFrame* call_frame);
}

namespace tf_moe {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::XlaOpKernel;
using ::tensorflow::XlaOpKernelContext;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// ---------------------------------------------------------------------------
// Registration of the FFI handlers into TF's XLA, once, at library load.

const bool kFfiHandlersRegistered = RegisterHostFfiHandlers({
    {"tf_moe_grouped_matmul", TfMoeGroupedMatmulHost},
    {"tf_moe_grouped_matmul_kernel_grad", TfMoeGroupedMatmulKernelGradHost},
});

// ---------------------------------------------------------------------------
// Op definitions.

constexpr char kFloatTypes[] = "T: {float, bfloat16, half}";

REGISTER_OP("TfMoeGroupedMatmul")
    .Input("rows: T")
    .Input("kernel: T")
    .Input("group_sizes: int32")
    .Output("out: T")
    .Attr(kFloatTypes)
    .Attr("transpose_kernel: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle rows, kernel, sizes;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &rows));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &kernel));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &sizes));
      bool transpose;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_kernel", &transpose));
      DimensionHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 0), c->Dim(sizes, 0), &unused));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(rows, 1),
                                  c->Dim(kernel, transpose ? 2 : 1), &unused));
      return SetCheckedOutput(
          c, 0, "out",
          {{"N", c->Value(c->Dim(rows, 0))},
           {"b", c->Value(c->Dim(kernel, transpose ? 1 : 2))}},
          "T");
    })
    .Doc("Grouped matmul over expert segments (tf_moe dropless): "
         "out[r] = rows[r] @ kernel[expert(r)].");

REGISTER_OP("TfMoeGroupedMatmulKernelGrad")
    .Input("rows: T")
    .Input("grad: T")
    .Input("group_sizes: int32")
    .Output("kernel_grad: T")
    .Attr(kFloatTypes)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle rows, grad, sizes;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &rows));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &sizes));
      DimensionHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(rows, 0), c->Dim(grad, 0), &unused));
      return SetCheckedOutput(c, 0, "kernel_grad",
                              {{"E", c->Value(c->Dim(sizes, 0))},
                               {"a", c->Value(c->Dim(rows, 1))},
                               {"b", c->Value(c->Dim(grad, 1))}},
                              "T");
    })
    .Doc("Kernel gradient of TfMoeGroupedMatmul: "
         "kernel_grad[e] = rows_e^T @ grad_e.");

// ---------------------------------------------------------------------------
// CPU kernels.

// A ParallelFor over TF's CPU worker threads (the intra-op pool).
ParallelFor WorkerParallelFor(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t num_tasks,
                   const std::function<void(int64_t)>& task) {
    workers->ParallelFor(num_tasks, [&task](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) task(i);
    });
  };
}

// Checks group_sizes [E] for rows [N, x] and its values (>= 0, sum <= N).
absl::Status CheckGroupSizes(const Tensor& rows, const Tensor& group_sizes,
                             int64_t num_experts) {
  if (rows.dims() != 2 || group_sizes.dims() != 1 ||
      group_sizes.dim_size(0) != num_experts) {
    return errors::InvalidArgument(
        "tf_moe: grouped matmul needs `rows` [N, x] and `group_sizes` [E] "
        "with E=", num_experts, ". Received: rows.shape=",
        rows.shape().DebugString(), ", group_sizes.shape=",
        group_sizes.shape().DebugString());
  }
  const std::string message = ValidateGroupSizes(
      group_sizes.flat<int32_t>().data(), num_experts, rows.dim_size(0));
  if (!message.empty()) return errors::InvalidArgument("tf_moe: ", message);
  return absl::OkStatus();
}

template <typename T>
class GroupedMatmulOp : public OpKernel {
 public:
  explicit GroupedMatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_kernel", &transpose_kernel_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& rows = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& group_sizes = ctx->input(2);
    OP_REQUIRES(
        ctx,
        rows.dims() == 2 && kernel.dims() == 3 &&
            kernel.dim_size(transpose_kernel_ ? 2 : 1) == rows.dim_size(1),
        errors::InvalidArgument(
            "tf_moe: grouped matmul needs rows [N, a] and kernel [E, a, b] "
            "([E, b, a] when transposed). Received: rows.shape=",
            rows.shape().DebugString(), ", kernel.shape=",
            kernel.shape().DebugString(),
            ", transpose_kernel=", transpose_kernel_));
    const int64_t num_experts = kernel.dim_size(0);
    OP_REQUIRES_OK(ctx, CheckGroupSizes(rows, group_sizes, num_experts));
    const int64_t b = kernel.dim_size(transpose_kernel_ ? 1 : 2);
    TensorShape out_shape;
    OP_REQUIRES_OK(ctx, CheckedTensorShape(
                            "out", {{"N", rows.dim_size(0)}, {"b", b}},
                            rows.dtype(), &out_shape));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    GroupedMatmul(Data<T>(rows), Data<T>(kernel),
                  group_sizes.flat<int32_t>().data(), rows.dim_size(0),
                  num_experts, rows.dim_size(1), b, transpose_kernel_,
                  MutableData<T>(out), WorkerParallelFor(ctx));
  }

 private:
  bool transpose_kernel_;
};

template <typename T>
class GroupedMatmulKernelGradOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& rows = ctx->input(0);
    const Tensor& grad = ctx->input(1);
    const Tensor& group_sizes = ctx->input(2);
    OP_REQUIRES(ctx,
                rows.dims() == 2 && grad.dims() == 2 &&
                    grad.dim_size(0) == rows.dim_size(0) &&
                    group_sizes.dims() == 1,
                errors::InvalidArgument(
                    "tf_moe: grouped matmul kernel gradient needs rows [N, a], "
                    "grad [N, b] and group_sizes [E]. Received: rows.shape=",
                    rows.shape().DebugString(), ", grad.shape=",
                    grad.shape().DebugString(), ", group_sizes.shape=",
                    group_sizes.shape().DebugString()));
    const int64_t num_experts = group_sizes.dim_size(0);
    OP_REQUIRES_OK(ctx, CheckGroupSizes(rows, group_sizes, num_experts));
    TensorShape kernel_grad_shape;
    OP_REQUIRES_OK(ctx, CheckedTensorShape("kernel_grad",
                                           {{"E", num_experts},
                                            {"a", rows.dim_size(1)},
                                            {"b", grad.dim_size(1)}},
                                           rows.dtype(), &kernel_grad_shape));
    Tensor* kernel_grad;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, kernel_grad_shape,
                                             &kernel_grad));
    GroupedMatmulKernelGrad(Data<T>(rows), Data<T>(grad),
                            group_sizes.flat<int32_t>().data(),
                            rows.dim_size(0), num_experts, rows.dim_size(1),
                            grad.dim_size(1), MutableData<T>(kernel_grad),
                            WorkerParallelFor(ctx));
  }
};

#define TF_MOE_REGISTER_CPU(T)                                              \
  REGISTER_KERNEL_BUILDER(                                                  \
      Name("TfMoeGroupedMatmul").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      GroupedMatmulOp<T>);                                                  \
  REGISTER_KERNEL_BUILDER(Name("TfMoeGroupedMatmulKernelGrad")             \
                              .Device(DEVICE_CPU)                          \
                              .TypeConstraint<T>("T"),                     \
                          GroupedMatmulKernelGradOp<T>);

TF_MOE_REGISTER_CPU(float)
TF_MOE_REGISTER_CPU(Eigen::bfloat16)
TF_MOE_REGISTER_CPU(Eigen::half)
#undef TF_MOE_REGISTER_CPU

// ---------------------------------------------------------------------------
// XLA lowerings: one typed FFI custom call each. Shapes are checked here, at
// compile time; the group size values at run time by the handler.

// Sets output 0 to the typed FFI custom call `target` on all inputs, with
// result `name` of shape `dims` (checked first: CheckedXlaShape) and input
// 0's dtype, and typed attributes `attributes` (an MLIR dictionary). A call
// whose result has no elements is marked as having side effects, so that XLA
// keeps it and the handler checks group_sizes (HasZeroElementArray).
void SetFfiCall(XlaOpKernelContext* ctx, const std::string& target,
                const char* name, std::initializer_list<NamedDim> dims,
                const std::string& attributes) {
  xla::Shape shape;
  OP_REQUIRES_OK(ctx,
                 CheckedXlaShape(name, dims, ctx->input_xla_type(0), &shape));
  std::vector<xla::XlaOp> operands;
  for (int i = 0; i < ctx->num_inputs(); ++i) operands.push_back(ctx->Input(i));
  ctx->SetOutput(
      0, xla::CustomCall(
             ctx->builder(), target, operands, shape, attributes,
             /*has_side_effect=*/HasZeroElementArray(shape),
             /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
             xla::CustomCallSchedule::SCHEDULE_NONE,
             xla::CustomCallApiVersion::API_VERSION_TYPED_FFI));
}

class GroupedMatmulXlaOp : public XlaOpKernel {
 public:
  explicit GroupedMatmulXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_kernel", &transpose_kernel_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape rows = ctx->InputShape(0);
    const TensorShape kernel = ctx->InputShape(1);
    const TensorShape sizes = ctx->InputShape(2);
    OP_REQUIRES(
        ctx,
        rows.dims() == 2 && kernel.dims() == 3 && sizes.dims() == 1 &&
            sizes.dim_size(0) == kernel.dim_size(0) &&
            kernel.dim_size(transpose_kernel_ ? 2 : 1) == rows.dim_size(1),
        errors::InvalidArgument(
            "tf_moe: grouped matmul needs rows [N, a], kernel [E, a, b] "
            "([E, b, a] when transposed) and group_sizes [E]. Received: "
            "rows.shape=", rows.DebugString(), ", kernel.shape=",
            kernel.DebugString(), ", group_sizes.shape=", sizes.DebugString(),
            ", transpose_kernel=", transpose_kernel_));
    const int64_t b = kernel.dim_size(transpose_kernel_ ? 1 : 2);
    SetFfiCall(ctx, "tf_moe_grouped_matmul", "out",
               {{"N", rows.dim_size(0)}, {"b", b}},
               std::string("{transpose_kernel = ") +
                   (transpose_kernel_ ? "1" : "0") + " : i64}");
  }

 private:
  bool transpose_kernel_;
};

class GroupedMatmulKernelGradXlaOp : public XlaOpKernel {
 public:
  using XlaOpKernel::XlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape rows = ctx->InputShape(0);
    const TensorShape grad = ctx->InputShape(1);
    const TensorShape sizes = ctx->InputShape(2);
    OP_REQUIRES(ctx,
                rows.dims() == 2 && grad.dims() == 2 && sizes.dims() == 1 &&
                    grad.dim_size(0) == rows.dim_size(0),
                errors::InvalidArgument(
                    "tf_moe: grouped matmul kernel gradient needs rows [N, a], "
                    "grad [N, b] and group_sizes [E]. Received: rows.shape=",
                    rows.DebugString(), ", grad.shape=", grad.DebugString(),
                    ", group_sizes.shape=", sizes.DebugString()));
    SetFfiCall(ctx, "tf_moe_grouped_matmul_kernel_grad", "kernel_grad",
               {{"E", sizes.dim_size(0)},
                {"a", rows.dim_size(1)},
                {"b", grad.dim_size(1)}},
               "{}");
  }
};

// Registered as plain kernels of the XLA JIT device rather than with
// REGISTER_XLA_OP: TF turns REGISTER_XLA_OP entries into JIT-device kernels
// only once per process (XlaOpRegistry::RegisterCompilationKernels), so a
// library loaded after the first XLA compilation would be missing them.
const std::vector<::tensorflow::DataType> kXlaTypes = {
    ::tensorflow::DT_FLOAT, ::tensorflow::DT_BFLOAT16, ::tensorflow::DT_HALF};

REGISTER_KERNEL_BUILDER(Name("TfMoeGroupedMatmul")
                            .Device("XLA_CPU_JIT")
                            .TypeConstraint("T", kXlaTypes),
                        GroupedMatmulXlaOp);
REGISTER_KERNEL_BUILDER(Name("TfMoeGroupedMatmulKernelGrad")
                            .Device("XLA_CPU_JIT")
                            .TypeConstraint("T", kXlaTypes),
                        GroupedMatmulKernelGradXlaOp);

}  // namespace
}  // namespace tf_moe
