"""Grouped matmul over expert segments: out[r] = rows[r] @ kernel[expert(r)],
the expert FFN step of dropless dispatch (`tf_moe.ops.dropless`).

rows [N, a] are sorted by expert; a `DroplessLayout` says which expert owns
each tile of `tile` rows (`tile_expert`, E past the last segment, whose rows
give 0). Implementations:

- "custom_call": the Bazel-built library of `tf_moe/ops/cc_dropless`, with
  gradients (JAX: typed FFI handlers via `jax.ffi` + `custom_vjp`).
- "ragged_dot": JAX's `jax.lax.ragged_dot`.
- "reference": any backend, a per-tile weight gather (memory
  O(N / tile * a * b): small sizes only).

Owns: the grouped matmul, loading its library. Does not own: the layout
(`tf_moe.ops.dropless`), expert weights (`tf_moe.layers.Experts`).

Shape letters: N rows, a input dim, b output dim, E experts.
"""

import functools
import os

import keras
from keras import ops


def row_expert(layout):
    """<int32>[N] expert of each row (E for rows past the last segment)."""
    return ops.repeat(layout.tile_expert, layout.tile)


GROUPED_MATMUL_IMPLEMENTATIONS = ("auto", "custom_call", "ragged_dot", "reference")
DROPLESS_LIBRARY = "libtf_moe_dropless_ffi.so"


def dropless_library_dirs():
    """Directories searched for `libtf_moe_dropless_ffi.so`, in order:
    $TF_MOE_OPS_DIR, `tf_moe/ops/cc_dropless/` (Bazel runfiles) and, outside
    Bazel tests, the checkout's `bazel-bin/tf_moe/ops/cc_dropless/`."""
    dirs = []
    if os.environ.get("TF_MOE_OPS_DIR"):
        dirs.append(os.environ["TF_MOE_OPS_DIR"])
    here = os.path.dirname(os.path.abspath(__file__))
    dirs.append(os.path.join(here, "cc_dropless"))
    if "TEST_SRCDIR" not in os.environ:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        dirs.append(os.path.join(root, "bazel-bin", "tf_moe", "ops", "cc_dropless"))
    return dirs


@functools.lru_cache(maxsize=None)
def _jax_grouped_matmul():
    """The custom-call grouped matmul with its VJP (JAX, CPU)."""
    import ctypes

    import jax
    import numpy as np

    path = next(
        (os.path.join(d, DROPLESS_LIBRARY) for d in dropless_library_dirs()
         if os.path.isfile(os.path.join(d, DROPLESS_LIBRARY))),
        None,
    )
    if path is None:
        raise RuntimeError(
            f"grouped_matmul(implementation='custom_call') needs {DROPLESS_LIBRARY}, "
            f"not found in {dropless_library_dirs()}. Build it with `bazel build "
            "//tf_moe/ops/cc_dropless:libtf_moe_dropless_ffi.so`."
        )
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in (
        ("tf_moe_grouped_matmul", "TfMoeGroupedMatmulHost"),
        ("tf_moe_grouped_matmul_kernel_grad", "TfMoeGroupedMatmulKernelGradHost"),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")

    def matmul(rows, kernel, tile_expert, transpose):
        out_dim = kernel.shape[1] if transpose else kernel.shape[2]
        return jax.ffi.ffi_call(
            "tf_moe_grouped_matmul", jax.ShapeDtypeStruct((rows.shape[0], out_dim), rows.dtype)
        )(rows, kernel, tile_expert, transpose_kernel=np.int64(transpose))

    @jax.custom_vjp
    def grouped(rows, kernel, tile_expert):
        return matmul(rows, kernel, tile_expert, 0)

    def grouped_fwd(rows, kernel, tile_expert):
        return matmul(rows, kernel, tile_expert, 0), (rows, kernel, tile_expert)

    def grouped_bwd(residuals, grad):
        rows, kernel, tile_expert = residuals
        d_rows = matmul(grad, kernel, tile_expert, 1)
        d_kernel = jax.ffi.ffi_call(
            "tf_moe_grouped_matmul_kernel_grad", jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
        )(rows, grad, tile_expert)
        return d_rows, d_kernel, np.zeros(tile_expert.shape, jax.dtypes.float0)

    grouped.defvjp(grouped_fwd, grouped_bwd)
    return grouped


def _resolve_implementation(implementation):
    if implementation not in GROUPED_MATMUL_IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {GROUPED_MATMUL_IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )
    jax_backend = keras.backend.backend() == "jax"
    if implementation in ("custom_call", "ragged_dot") and not jax_backend:
        raise ValueError(
            f"grouped_matmul(implementation={implementation!r}) needs the JAX "
            f"backend. Received: backend {keras.backend.backend()!r}; use 'reference'."
        )
    if implementation != "auto":
        return implementation
    return "ragged_dot" if jax_backend else "reference"


def grouped_matmul(rows, kernel, layout, implementation="auto"):
    """out[r] = rows[r] @ kernel[expert(r)]. rows [N, a], kernel [E, a, b] ->
    [N, b]; 0 for rows past the last segment.

    `implementation`: "auto" ("ragged_dot" on JAX, else "reference"),
    "custom_call" (JAX on CPU), "ragged_dot" (JAX) or "reference"."""
    num_experts, a, b = kernel.shape
    implementation = _resolve_implementation(implementation)
    kernel = ops.cast(kernel, rows.dtype)
    if implementation == "custom_call":
        return _jax_grouped_matmul()(rows, kernel, layout.tile_expert)
    if implementation == "ragged_dot":
        import jax

        # ragged_dot wants the groups to cover all N rows: the unused tail
        # goes to the last expert, and its outputs (and so their gradients)
        # are masked to 0.
        tail = layout.num_rows - ops.sum(layout.group_sizes)
        sizes = ops.concatenate(
            [layout.group_sizes[:-1], layout.group_sizes[-1:] + tail], 0
        )
        out = jax.lax.ragged_dot(rows, kernel, sizes)
        used = row_expert(layout) < num_experts  # [N]
        return ops.where(used[:, None], out, ops.zeros_like(out))
    tile = layout.tile
    padded = ops.concatenate([kernel, ops.zeros((1, a, b), kernel.dtype)], 0)
    weights = ops.take(padded, layout.tile_expert, axis=0)  # [N / tile, a, b]
    tiles = ops.reshape(rows, (-1, tile, a))
    out = ops.einsum("tra,tab->trb", tiles, weights)
    return ops.reshape(out, (-1, b))
