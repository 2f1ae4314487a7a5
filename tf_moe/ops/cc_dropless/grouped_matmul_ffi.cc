// Typed XLA FFI handlers (CPU platform "Host") for the dropless grouped
// matmul and its kernel adjoint (math in grouped_matmul_core.h).
// JAX: jax.ffi.register_ffi_target(name, pycapsule, platform="cpu");
// TensorFlow: tf_ops.cc registers them into TF's XLA at library load.
//
// Targets:
//   tf_moe_grouped_matmul              TfMoeGroupedMatmulHost
//   tf_moe_grouped_matmul_bias         TfMoeGroupedMatmulBiasHost (with a
//                                      per-expert bias and relu fused)
//   tf_moe_grouped_matmul_kernel_grad  TfMoeGroupedMatmulKernelGradHost
//
// Expert e's segment is rows [start_e, start_e + group_sizes[e]), start_e =
// sum of the earlier sizes; rows at or past sum(group_sizes) give 0.
//
// Shape letters: N rows, a input dim, b output dim, E experts.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/ffi_common.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_checks.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_core.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace {

using SizesBuffer = ffi::Buffer<ffi::S32>;

// A ParallelFor over the XLA FFI thread pool (JAX CPU: the client's intra-op
// pool; where a runtime gives none, num_threads() is 0 and the tasks run on
// the calling thread). The calling thread takes tasks too, so it never waits
// on a pool that is busy with work of its own: helpers that start after the
// last task was taken return at once.
ParallelFor PoolParallelFor(ffi::ThreadPool& pool) {
  return [&pool](int64_t num_tasks, const std::function<void(int64_t)>& task) {
    const int64_t helpers =
        std::min<int64_t>(pool.num_threads(), num_tasks - 1);
    if (helpers <= 0) {
      SerialFor(num_tasks, task);
      return;
    }
    struct State {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      int64_t num_tasks = 0;
      const std::function<void(int64_t)>* task = nullptr;
      std::mutex mu;
      std::condition_variable all_done;
    };
    auto state = std::make_shared<State>();
    state->num_tasks = num_tasks;
    state->task = &task;  // valid until every taken task is done
    auto work = [state] {
      for (int64_t i; (i = state->next.fetch_add(1)) < state->num_tasks;) {
        (*state->task)(i);
        if (state->done.fetch_add(1) + 1 == state->num_tasks) {
          std::lock_guard<std::mutex> lock(state->mu);
          state->all_done.notify_all();
        }
      }
    };
    for (int64_t t = 0; t < helpers; ++t) {
      auto helper = work;
      pool.Schedule(std::move(helper));
    }
    work();
    std::unique_lock<std::mutex> lock(state->mu);
    state->all_done.wait(lock, [&] { return state->done.load() == num_tasks; });
  };
}

// Checks the size values (>= 0, sum <= N).
ffi::Error CheckSizes(const SizesBuffer& group_sizes, int64_t num_rows) {
  std::string message = ValidateGroupSizes(
      group_sizes.typed_data(), group_sizes.dimensions()[0], num_rows);
  if (message.empty()) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("tf_moe: " + message);
}

// The forward product after its checks; `bias` [E, b] or nullptr.
ffi::Error Forward(ffi::ThreadPool& pool, ffi::AnyBuffer rows,
                   ffi::AnyBuffer kernel, SizesBuffer group_sizes,
                   bool transpose_kernel, const void* bias, bool relu,
                   ffi::AnyBuffer out) {
  auto r = rows.dimensions();
  auto k = kernel.dimensions();
  auto o = out.dimensions();
  if (auto e = CheckSizes(group_sizes, r[0]); !e.success()) return e;
  return DispatchFloatType(rows.element_type(), [&](auto t) {
    using T = decltype(t);
    GroupedMatmul<T>(static_cast<const T*>(rows.untyped_data()),
                     static_cast<const T*>(kernel.untyped_data()),
                     group_sizes.typed_data(), r[0], k[0], r[1], o[1],
                     transpose_kernel, static_cast<T*>(out.untyped_data()),
                     PoolParallelFor(pool), static_cast<const T*>(bias), relu);
    return ffi::Error::Success();
  });
}

ffi::Error GroupedMatmulHost(ffi::ThreadPool pool, ffi::AnyBuffer rows,
                             ffi::AnyBuffer kernel, SizesBuffer group_sizes,
                             int64_t transpose_kernel,
                             ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckGroupedMatmul(rows, kernel, group_sizes, transpose_kernel,
                                  *out);
      !e.success()) {
    return e;
  }
  return Forward(pool, rows, kernel, group_sizes, transpose_kernel != 0,
                 /*bias=*/nullptr, /*relu=*/false, *out);
}

ffi::Error GroupedMatmulBiasHost(ffi::ThreadPool pool, ffi::AnyBuffer rows,
                                 ffi::AnyBuffer kernel, ffi::AnyBuffer bias,
                                 SizesBuffer group_sizes, int64_t activation,
                                 ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = CheckGroupedMatmulBias(rows, kernel, bias, group_sizes,
                                      activation, *out);
      !e.success()) {
    return e;
  }
  return Forward(pool, rows, kernel, group_sizes, /*transpose_kernel=*/false,
                 bias.untyped_data(),
                 activation == static_cast<int64_t>(FusedActivation::kRelu),
                 *out);
}

ffi::Error GroupedMatmulKernelGradHost(ffi::ThreadPool pool,
                                       ffi::AnyBuffer rows, ffi::AnyBuffer grad,
                                       SizesBuffer group_sizes,
                                       ffi::Result<ffi::AnyBuffer> kernel_grad) {
  if (auto e = CheckKernelGrad(rows, grad, group_sizes, *kernel_grad);
      !e.success()) {
    return e;
  }
  auto r = rows.dimensions();
  auto g = grad.dimensions();
  auto k = kernel_grad->dimensions();
  if (auto e = CheckSizes(group_sizes, r[0]); !e.success()) return e;
  return DispatchFloatType(rows.element_type(), [&](auto t) {
    using T = decltype(t);
    GroupedMatmulKernelGrad<T>(static_cast<const T*>(rows.untyped_data()),
                               static_cast<const T*>(grad.untyped_data()),
                               group_sizes.typed_data(), r[0], k[0], r[1],
                               g[1],
                               static_cast<T*>(kernel_grad->untyped_data()),
                               PoolParallelFor(pool));
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace tf_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulHost, tf_moe::GroupedMatmulHost,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()              // CPU tasks (may have none)
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b] / [E, b, a]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Attr<int64_t>("transpose_kernel")        // 0 or 1
        .Ret<xla::ffi::AnyBuffer>());             // out [N, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulBiasHost, tf_moe::GroupedMatmulBiasHost,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()              // CPU tasks (may have none)
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b]
        .Arg<xla::ffi::AnyBuffer>()               // bias [E, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Attr<int64_t>("activation")              // 0 none, 1 relu
        .Ret<xla::ffi::AnyBuffer>());             // out [N, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulKernelGradHost, tf_moe::GroupedMatmulKernelGradHost,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::ThreadPool>()              // CPU tasks (may have none)
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // grad [N, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // group_sizes [E]
        .Ret<xla::ffi::AnyBuffer>());             // kernel_grad [E, a, b]
