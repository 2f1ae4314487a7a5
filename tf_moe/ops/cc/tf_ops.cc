// TensorFlow ops for custom-call dispatch/combine: REGISTER_OP, CPU kernels
// (eager and graph mode), and XLA lowerings (jit_compile=True) to the typed
// XLA FFI handlers of ffi_handlers.cc, which a static initializer here
// registers into TensorFlow's own XLA (platform "Host").
//
//   TfMoeDispatch     x [G, S, d] -> expert_inputs [E, G, C, d]
//   TfMoeCombine      expert_outputs [E, G, C, d], combine_weight -> [G, S, d]
//   TfMoeCombineGrad  grad_output [G, S, d], expert_outputs -> grad of
//                     expert_outputs [E, G, C, d], grad of combine_weight
//
// Every op also takes the routing: expert_index, position <int32>[G, S, k]
// and dispatch_mask <bool>[G, S, k]. Gradients are registered in Python
// (tf_moe/ops/custom_call.py). Math: dispatch_core.h.

#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/logging.h"
#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/tf_op_support.h"
#include "tf_moe/ops/cc/ffi_handlers.h"
#include "xla/ffi/api/c_api.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/shape_util.h"

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
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// ---------------------------------------------------------------------------
// Registration of the FFI handlers into TF's XLA, once, at library load.

const bool kFfiHandlersRegistered = RegisterHostFfiHandlers({
    {"tf_moe_dispatch", TfMoeDispatchHost},
    {"tf_moe_combine", TfMoeCombineHost},
    {"tf_moe_combine_grad", TfMoeCombineGradHost},
});

// ---------------------------------------------------------------------------
// Op definitions.

constexpr char kFloatTypes[] = "T: {float, bfloat16, half}";

// Routing inputs [G, S, k] all have the same shape; returns it.
absl::Status RoutingShape(InferenceContext* c, int first, ShapeHandle* out) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first), 3, out));
  for (int i = first + 1; i < first + 3; ++i) {
    TF_RETURN_IF_ERROR(c->Merge(*out, c->input(i), out));
  }
  return absl::OkStatus();
}

// The attributes num_experts and capacity, checked (ValidateRoutingAttrs):
// the attribute definitions give the minimum 1, this also the maximum.
absl::Status GetRoutingAttrs(InferenceContext* c, int64_t* num_experts,
                             int64_t* capacity) {
  TF_RETURN_IF_ERROR(c->GetAttr("num_experts", num_experts));
  TF_RETURN_IF_ERROR(c->GetAttr("capacity", capacity));
  return CheckStatus(ValidateRoutingAttrs(*num_experts, *capacity));
}

REGISTER_OP("TfMoeDispatch")
    .Input("x: T")
    .Input("expert_index: int32")
    .Input("position: int32")
    .Input("dispatch_mask: bool")
    .Output("expert_inputs: T")
    .Attr(kFloatTypes)
    .Attr("num_experts: int >= 1")
    .Attr("capacity: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      int64_t num_experts, capacity;
      TF_RETURN_IF_ERROR(GetRoutingAttrs(c, &num_experts, &capacity));
      ShapeHandle x, routing;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(RoutingShape(c, 1, &routing));
      return SetCheckedOutput(c, 0, "expert_inputs",
                              {{"num_experts", num_experts},
                               {"G", c->Value(c->Dim(x, 0))},
                               {"capacity", capacity},
                               {"d", c->Value(c->Dim(x, 2))}},
                              "T");
    })
    .Doc("Dispatch x [G, S, d] into expert buffers [E, G, C, d] (tf_moe).");

REGISTER_OP("TfMoeCombine")
    .Input("expert_outputs: T")
    .Input("expert_index: int32")
    .Input("position: int32")
    .Input("dispatch_mask: bool")
    .Input("combine_weight: float")
    .Output("outputs: T")
    .Attr(kFloatTypes)
    .Attr("num_experts: int >= 1")
    .Attr("capacity: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      int64_t num_experts, capacity;
      TF_RETURN_IF_ERROR(GetRoutingAttrs(c, &num_experts, &capacity));
      ShapeHandle y, routing;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &y));
      TF_RETURN_IF_ERROR(RoutingShape(c, 1, &routing));
      return SetCheckedOutput(c, 0, "outputs",
                              {{"G", c->Value(c->Dim(routing, 0))},
                               {"S", c->Value(c->Dim(routing, 1))},
                               {"d", c->Value(c->Dim(y, 3))}},
                              "T");
    })
    .Doc("Weighted combine of expert buffers [E, G, C, d] to [G, S, d].");

REGISTER_OP("TfMoeCombineGrad")
    .Input("grad_output: T")
    .Input("expert_outputs: T")
    .Input("expert_index: int32")
    .Input("position: int32")
    .Input("dispatch_mask: bool")
    .Input("combine_weight: float")
    .Output("grad_expert_outputs: T")
    .Output("grad_combine_weight: float")
    .Attr(kFloatTypes)
    .Attr("num_experts: int >= 1")
    .Attr("capacity: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      int64_t num_experts, capacity;
      TF_RETURN_IF_ERROR(GetRoutingAttrs(c, &num_experts, &capacity));
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(5));
      return absl::OkStatus();
    })
    .Doc("Adjoint of TfMoeCombine.");

// ---------------------------------------------------------------------------
// CPU kernels.

// Common part of the three kernels: attributes and the checked routing.
class RoutingKernel : public OpKernel {
 public:
  explicit RoutingKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_experts", &num_experts_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("capacity", &capacity_));
    OP_REQUIRES_OK(ctx,
                   CheckStatus(ValidateRoutingAttrs(num_experts_, capacity_)));
  }

 protected:
  // Reads routing inputs first..first+2 (and the [G, S, k] input `weight` if
  // >= 0) into `r`, checking shapes and every routed index (whatever d).
  absl::Status GetRouting(OpKernelContext* ctx, int first, int weight,
                          RoutingView* r) {
    const Tensor& expert_index = ctx->input(first);
    const Tensor& position = ctx->input(first + 1);
    const Tensor& dispatch_mask = ctx->input(first + 2);
    if (expert_index.dims() != 3) {
      return errors::InvalidArgument(
          "tf_moe: `expert_index` must have rank 3 [G, S, k]. Received: ",
          expert_index.shape().DebugString());
    }
    for (int i : {first + 1, first + 2, weight}) {
      if (i >= 0 && ctx->input(i).shape() != expert_index.shape()) {
        return errors::InvalidArgument(
            "tf_moe: routing input ", i, " must have shape ",
            expert_index.shape().DebugString(),
            ". Received: ", ctx->input(i).shape().DebugString());
      }
    }
    r->expert_index = expert_index.flat<int32_t>().data();
    r->position = position.flat<int32_t>().data();
    r->dispatch_mask = dispatch_mask.flat<bool>().data();
    r->groups = expert_index.dim_size(0);
    r->group_size = expert_index.dim_size(1);
    r->k = expert_index.dim_size(2);
    r->num_experts = num_experts_;
    r->capacity = capacity_;
    const std::string message = ValidateRouting(*r);
    if (!message.empty()) return errors::InvalidArgument("tf_moe: ", message);
    return absl::OkStatus();
  }

  // Checks tokens [G, S, d]; returns d.
  absl::Status CheckTokens(const RoutingView& r, const Tensor& tokens,
                           const char* tokens_name, int64_t* d) {
    if (tokens.dims() != 3 || tokens.dim_size(0) != r.groups ||
        tokens.dim_size(1) != r.group_size) {
      return errors::InvalidArgument(
          "tf_moe: `", tokens_name, "` must have shape [", r.groups, ", ",
          r.group_size, ", d]. Received: ", tokens.shape().DebugString());
    }
    *d = tokens.dim_size(2);
    return absl::OkStatus();
  }

  // Checks an expert buffer is [E, G, C, d] (compared dimension by
  // dimension: a TensorShape of E, C from the attributes could overflow).
  absl::Status CheckExperts(const RoutingView& r, const TensorShape& experts,
                            const char* experts_name, int64_t d) {
    if (experts.dims() != 4 || experts.dim_size(0) != r.num_experts ||
        experts.dim_size(1) != r.groups || experts.dim_size(2) != r.capacity ||
        experts.dim_size(3) != d) {
      return errors::InvalidArgument(
          "tf_moe: `", experts_name, "` must have shape [", r.num_experts,
          ", ", r.groups, ", ", r.capacity, ", ", d,
          "]. Received: ", experts.DebugString());
    }
    return absl::OkStatus();
  }

  int64_t num_experts_;
  int64_t capacity_;
};

template <typename T>
class DispatchOp : public RoutingKernel {
 public:
  using RoutingKernel::RoutingKernel;
  void Compute(OpKernelContext* ctx) override {
    RoutingView r;
    OP_REQUIRES_OK(ctx, GetRouting(ctx, 1, -1, &r));
    const Tensor& x = ctx->input(0);
    int64_t d = 0;
    OP_REQUIRES_OK(ctx, CheckTokens(r, x, "x", &d));
    TensorShape out_shape;
    OP_REQUIRES_OK(ctx, CheckedTensorShape("expert_inputs",
                                           {{"num_experts", num_experts_},
                                            {"G", r.groups},
                                            {"capacity", capacity_},
                                            {"d", d}},
                                           x.dtype(), &out_shape));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    Dispatch(Data<T>(x), r, d, MutableData<T>(out));
  }
};

template <typename T>
class CombineOp : public RoutingKernel {
 public:
  using RoutingKernel::RoutingKernel;
  void Compute(OpKernelContext* ctx) override {
    RoutingView r;
    OP_REQUIRES_OK(ctx, GetRouting(ctx, 1, 4, &r));
    const Tensor& y = ctx->input(0);
    OP_REQUIRES(ctx, y.dims() == 4,
                errors::InvalidArgument(
                    "tf_moe: `expert_outputs` must have rank 4. Received: ",
                    y.shape().DebugString()));
    const int64_t d = y.dim_size(3);
    OP_REQUIRES_OK(ctx, CheckExperts(r, y.shape(), "expert_outputs", d));
    TensorShape out_shape;
    OP_REQUIRES_OK(ctx, CheckedTensorShape(
                            "outputs",
                            {{"G", r.groups}, {"S", r.group_size}, {"d", d}},
                            y.dtype(), &out_shape));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    Combine(Data<T>(y), r, ctx->input(4).flat<float>().data(), d,
            MutableData<T>(out));
  }
};

template <typename T>
class CombineGradOp : public RoutingKernel {
 public:
  using RoutingKernel::RoutingKernel;
  void Compute(OpKernelContext* ctx) override {
    RoutingView r;
    OP_REQUIRES_OK(ctx, GetRouting(ctx, 2, 5, &r));
    const Tensor& grad_output = ctx->input(0);
    const Tensor& y = ctx->input(1);
    int64_t d = 0;
    OP_REQUIRES_OK(ctx, CheckTokens(r, grad_output, "grad_output", &d));
    OP_REQUIRES_OK(ctx, CheckExperts(r, y.shape(), "expert_outputs", d));
    Tensor* dy;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dy));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(5).shape(), &dw));
    CombineGrad(Data<T>(grad_output), Data<T>(y), r,
                ctx->input(5).flat<float>().data(), d, MutableData<T>(dy),
                dw->flat<float>().data());
  }
};

#define TF_MOE_REGISTER_CPU(T)                                               \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("TfMoeDispatch").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
      DispatchOp<T>);                                                        \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("TfMoeCombine").Device(DEVICE_CPU).TypeConstraint<T>("T"),        \
      CombineOp<T>);                                                         \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("TfMoeCombineGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),    \
      CombineGradOp<T>);

TF_MOE_REGISTER_CPU(float)
TF_MOE_REGISTER_CPU(Eigen::bfloat16)
TF_MOE_REGISTER_CPU(Eigen::half)
#undef TF_MOE_REGISTER_CPU

// ---------------------------------------------------------------------------
// XLA lowerings: one typed FFI custom call each.

class FfiCallOp : public XlaOpKernel {
 public:
  FfiCallOp(OpKernelConstruction* ctx, std::string target)
      : XlaOpKernel(ctx), target_(std::move(target)) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_experts", &num_experts_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("capacity", &capacity_));
    OP_REQUIRES_OK(ctx,
                   CheckStatus(ValidateRoutingAttrs(num_experts_, capacity_)));
  }

 protected:
  // The custom call on all inputs; `shape` is its result (a tuple for
  // several outputs). A call with a result of no elements (d = 0) is marked
  // as having side effects, so that XLA keeps it and the handler checks the
  // routing (HasZeroElementArray).
  xla::XlaOp Call(XlaOpKernelContext* ctx, const xla::Shape& shape) {
    std::vector<xla::XlaOp> operands;
    for (int i = 0; i < ctx->num_inputs(); ++i) operands.push_back(ctx->Input(i));
    // Typed FFI attributes, as an MLIR dictionary.
    const std::string attributes =
        "{num_experts = " + std::to_string(num_experts_) +
        " : i64, capacity = " + std::to_string(capacity_) + " : i64}";
    return xla::CustomCall(ctx->builder(), target_, operands, shape,
                           attributes,
                           /*has_side_effect=*/HasZeroElementArray(shape),
                           /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
                           xla::CustomCallSchedule::SCHEDULE_NONE,
                           xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  }

  // The call with one result `name`, of input 0's dtype and shape `dims`
  // (checked first: CheckedXlaShape).
  void SetCallOutput(XlaOpKernelContext* ctx, const char* name,
                     std::initializer_list<NamedDim> dims) {
    xla::Shape shape;
    OP_REQUIRES_OK(ctx, CheckedXlaShape(name, dims, ctx->input_xla_type(0),
                                        &shape));
    ctx->SetOutput(0, Call(ctx, shape));
  }

  std::string target_;
  int64_t num_experts_;
  int64_t capacity_;
};

class DispatchXlaOp : public FfiCallOp {
 public:
  explicit DispatchXlaOp(OpKernelConstruction* ctx)
      : FfiCallOp(ctx, "tf_moe_dispatch") {}
  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape x = ctx->InputShape(0);
    OP_REQUIRES(ctx, x.dims() == 3,
                errors::InvalidArgument("tf_moe: `x` must have rank 3. "
                                        "Received: ", x.DebugString()));
    SetCallOutput(ctx, "expert_inputs",
                  {{"num_experts", num_experts_},
                   {"G", x.dim_size(0)},
                   {"capacity", capacity_},
                   {"d", x.dim_size(2)}});
  }
};

class CombineXlaOp : public FfiCallOp {
 public:
  explicit CombineXlaOp(OpKernelConstruction* ctx)
      : FfiCallOp(ctx, "tf_moe_combine") {}
  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape y = ctx->InputShape(0);
    const TensorShape routing = ctx->InputShape(1);
    OP_REQUIRES(ctx, y.dims() == 4 && routing.dims() == 3,
                errors::InvalidArgument(
                    "tf_moe: `expert_outputs` must have rank 4 and the routing "
                    "rank 3. Received: ", y.DebugString(), ", ",
                    routing.DebugString()));
    SetCallOutput(ctx, "outputs",
                  {{"G", routing.dim_size(0)},
                   {"S", routing.dim_size(1)},
                   {"d", y.dim_size(3)}});
  }
};

class CombineGradXlaOp : public FfiCallOp {
 public:
  explicit CombineGradXlaOp(OpKernelConstruction* ctx)
      : FfiCallOp(ctx, "tf_moe_combine_grad") {}
  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<int64_t> y_dims, weight_dims;
    for (int64_t v : ctx->InputShape(1).dim_sizes()) y_dims.push_back(v);
    for (int64_t v : ctx->InputShape(5).dim_sizes()) weight_dims.push_back(v);
    xla::XlaOp call = Call(
        ctx, xla::ShapeUtil::MakeTupleShape(
                 {xla::ShapeUtil::MakeShape(ctx->input_xla_type(1), y_dims),
                  xla::ShapeUtil::MakeShape(xla::F32, weight_dims)}));
    ctx->SetOutput(0, xla::GetTupleElement(call, 0));
    ctx->SetOutput(1, xla::GetTupleElement(call, 1));
  }
};

// Registered as plain kernels of the XLA JIT devices rather than with
// REGISTER_XLA_OP: TF turns REGISTER_XLA_OP entries into JIT-device kernels
// only once per process (XlaOpRegistry::RegisterCompilationKernels), so a
// library loaded after the first XLA compilation would be missing them.
#define TF_MOE_REGISTER_XLA(DEVICE)                                          \
  REGISTER_KERNEL_BUILDER(Name("TfMoeDispatch")                             \
                              .Device(DEVICE)                               \
                              .TypeConstraint("T", kXlaTypes),              \
                          DispatchXlaOp);                                   \
  REGISTER_KERNEL_BUILDER(Name("TfMoeCombine")                              \
                              .Device(DEVICE)                               \
                              .TypeConstraint("T", kXlaTypes),              \
                          CombineXlaOp);                                    \
  REGISTER_KERNEL_BUILDER(Name("TfMoeCombineGrad")                          \
                              .Device(DEVICE)                               \
                              .TypeConstraint("T", kXlaTypes),              \
                          CombineGradXlaOp);

const std::vector<::tensorflow::DataType> kXlaTypes = {
    ::tensorflow::DT_FLOAT, ::tensorflow::DT_BFLOAT16, ::tensorflow::DT_HALF};
TF_MOE_REGISTER_XLA("XLA_CPU_JIT")
#undef TF_MOE_REGISTER_XLA

}  // namespace
}  // namespace tf_moe
