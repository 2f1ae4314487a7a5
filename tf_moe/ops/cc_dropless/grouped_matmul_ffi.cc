// Typed XLA FFI handlers (CPU platform "Host") for the dropless grouped
// matmul and its kernel adjoint (math in grouped_matmul_core.h). JAX only:
// jax.ffi.register_ffi_target(name, pycapsule, platform="cpu").
//
// Targets:
//   tf_moe_grouped_matmul              TfMoeGroupedMatmulHost
//   tf_moe_grouped_matmul_kernel_grad  TfMoeGroupedMatmulKernelGradHost

#include <cstdint>
#include <string>

#include "tf_moe/ops/cc/dispatch_core.h"
#include "tf_moe/ops/cc/ffi_common.h"
#include "tf_moe/ops/cc_dropless/grouped_matmul_core.h"
#include "xla/ffi/api/ffi.h"

namespace tf_moe {
namespace {

using TileBuffer = ffi::Buffer<ffi::S32>;

// Checks rows [N, x] against tile_expert [N / tile] and returns the tile.
ffi::Error CheckRows(const ffi::AnyBuffer& rows, const char* name,
                     const TileBuffer& tile_expert, int64_t* tile) {
  auto r = rows.dimensions();
  auto t = tile_expert.dimensions();
  if (r.size() != 2 || t.size() != 1 || t[0] < 1 || r[0] % t[0] != 0) {
    return ffi::Error::InvalidArgument(
        std::string("tf_moe: `") + name + "` must be [N, x] and tile_expert " +
        "[N / tile]. Received: " + name + ".shape=" + DimsToString(r) +
        ", tile_expert.shape=" + DimsToString(t));
  }
  *tile = r[0] / t[0];
  return ffi::Error::Success();
}

ffi::Error CheckTiles(const TileBuffer& tile_expert, int64_t num_experts) {
  std::string message = ValidateTileExpert(
      tile_expert.typed_data(), tile_expert.dimensions()[0], num_experts);
  if (message.empty()) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("tf_moe: " + message);
}

ffi::Error GroupedMatmulHost(ffi::AnyBuffer rows, ffi::AnyBuffer kernel,
                             TileBuffer tile_expert, int64_t transpose_kernel,
                             ffi::Result<ffi::AnyBuffer> out) {
  int64_t tile;
  if (auto e = CheckRows(rows, "rows", tile_expert, &tile); !e.success()) {
    return e;
  }
  auto r = rows.dimensions();
  auto k = kernel.dimensions();
  auto o = out->dimensions();
  const int64_t a = r[1];
  if (k.size() != 3 || o.size() != 2 || o[0] != r[0] ||
      (transpose_kernel ? k[2] : k[1]) != a ||
      (transpose_kernel ? k[1] : k[2]) != o[1] ||
      kernel.element_type() != rows.element_type() ||
      out->element_type() != rows.element_type()) {
    return ffi::Error::InvalidArgument(
        "tf_moe: grouped matmul needs rows [N, a], kernel [E, a, b] ([E, b, "
        "a] when transposed) and output [N, b] of one dtype. Received: "
        "rows.shape=" + DimsToString(r) + ", kernel.shape=" + DimsToString(k) +
        ", output.shape=" + DimsToString(o) +
        ", transpose_kernel=" + std::to_string(transpose_kernel));
  }
  if (auto e = CheckTiles(tile_expert, k[0]); !e.success()) return e;
  return DispatchFloatType(rows.element_type(), [&](auto t) {
    using T = decltype(t);
    GroupedMatmul<T>(static_cast<const T*>(rows.untyped_data()),
                     static_cast<const T*>(kernel.untyped_data()),
                     tile_expert.typed_data(), r[0], tile, k[0], a, o[1],
                     transpose_kernel != 0,
                     static_cast<T*>(out->untyped_data()));
    return ffi::Error::Success();
  });
}

ffi::Error GroupedMatmulKernelGradHost(ffi::AnyBuffer rows, ffi::AnyBuffer grad,
                                       TileBuffer tile_expert,
                                       ffi::Result<ffi::AnyBuffer> kernel_grad) {
  int64_t tile;
  if (auto e = CheckRows(rows, "rows", tile_expert, &tile); !e.success()) {
    return e;
  }
  auto r = rows.dimensions();
  auto g = grad.dimensions();
  auto k = kernel_grad->dimensions();
  if (g.size() != 2 || g[0] != r[0] || k.size() != 3 || k[1] != r[1] ||
      k[2] != g[1] || grad.element_type() != rows.element_type() ||
      kernel_grad->element_type() != rows.element_type()) {
    return ffi::Error::InvalidArgument(
        "tf_moe: grouped matmul kernel gradient needs rows [N, a], grad "
        "[N, b] and kernel_grad [E, a, b] of one dtype. Received: "
        "rows.shape=" + DimsToString(r) + ", grad.shape=" + DimsToString(g) +
        ", kernel_grad.shape=" + DimsToString(k));
  }
  if (auto e = CheckTiles(tile_expert, k[0]); !e.success()) return e;
  return DispatchFloatType(rows.element_type(), [&](auto t) {
    using T = decltype(t);
    GroupedMatmulKernelGrad<T>(static_cast<const T*>(rows.untyped_data()),
                               static_cast<const T*>(grad.untyped_data()),
                               tile_expert.typed_data(), r[0], tile, k[0],
                               r[1], g[1],
                               static_cast<T*>(kernel_grad->untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace tf_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulHost, tf_moe::GroupedMatmulHost,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // kernel [E, a, b] / [E, b, a]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // tile_expert [N / tile]
        .Attr<int64_t>("transpose_kernel")        // 0 or 1
        .Ret<xla::ffi::AnyBuffer>());             // out [N, b]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TfMoeGroupedMatmulKernelGradHost, tf_moe::GroupedMatmulKernelGradHost,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()               // rows [N, a]
        .Arg<xla::ffi::AnyBuffer>()               // grad [N, b]
        .Arg<xla::ffi::Buffer<xla::ffi::S32>>()   // tile_expert [N / tile]
        .Ret<xla::ffi::AnyBuffer>());             // kernel_grad [E, a, b]
