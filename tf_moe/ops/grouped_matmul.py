"""Grouped matmul over expert segments: out[r] = rows[r] @ kernel[expert(r)],
the expert FFN step of dropless dispatch (`tf_moe.ops.dropless`).

rows [N, a] are sorted by expert in contiguous segments; a `DroplessLayout`
gives their sizes (`group_sizes <int32>[E]`, segments from row 0 in expert
order) and the expert of each tile of `tile` rows (`tile_expert`, E past the
last segment, whose rows give 0). Implementations:

- "custom_call": the Bazel-built libraries of `tf_moe/ops/cc_dropless` (Eigen
  GEMMs over each segment on CPU), with gradients. TensorFlow (CPU):
  `libtf_moe_dropless_ops.so` via `tf.load_op_library`, eager, graph and
  `jit_compile=True`, gradients via `tf.RegisterGradient`. JAX (CPU): typed FFI
  handlers of `libtf_moe_dropless_ffi.so` via `jax.ffi`, `jax.custom_vjp`.
  JAX (CUDA): cuBLAS handlers of `libtf_moe_dropless_ffi_cuda.so`
  (`cc_dropless/grouped_matmul_cuda.cu.cc`), the same calls and VJP.
- "ragged_dot": JAX's `jax.lax.ragged_dot`.
- "reference": any backend, a per-tile weight gather (memory
  O(N / tile * a * b): small sizes only).

The libraries are found and loaded by `tf_moe.ops.library` (`LIBRARY`);
build them with `bazel build //tf_moe/ops/cc_dropless:all`.

Owns: the grouped matmul and its gradients. Does not own: the layout
(`tf_moe.ops.dropless`), expert weights and math (`tf_moe.layers.Experts`),
loading (`tf_moe.ops.library`), the C++ math
(`cc_dropless/grouped_matmul_core.h`).

Shape letters: N rows, a input dim, b output dim, E experts.
"""

import functools

import keras
from keras import ops

from tf_moe.ops.custom_call import jax_ffi_call
from tf_moe.ops.library import CustomCallUnavailableError, NativeLibrary, jax_platform


def row_expert(layout):
    """<int32>[N] expert of each row (E for rows past the last segment)."""
    return ops.repeat(layout.tile_expert, layout.tile)


GROUPED_MATMUL_IMPLEMENTATIONS = ("auto", "custom_call", "ragged_dot", "reference")
DROPLESS_LIBRARY = "libtf_moe_dropless_ffi.so"
DROPLESS_TF_LIBRARY = "libtf_moe_dropless_ops.so"
DROPLESS_CUDA_LIBRARY = "libtf_moe_dropless_ffi_cuda.so"

BUILD_HINT = (
    "Build the grouped-matmul libraries from the repository root with "
    "`bazel build //tf_moe/ops/cc_dropless:all` (add "
    "--repo_env=TF_MOE_PYTHON=$(which python) to pick the Python whose "
    "TensorFlow to build against), or set TF_MOE_OPS_DIR to a directory "
    f"holding {DROPLESS_TF_LIBRARY} and {DROPLESS_LIBRARY}. For CUDA GPUs: "
    "`bazel build //tf_moe/ops/cc_dropless:libtf_moe_dropless_ffi_cuda.so` "
    f"(needs nvcc) builds {DROPLESS_CUDA_LIBRARY}."
)


def _register_tf_gradients(lib):
    import tensorflow as tf

    @tf.RegisterGradient("TfMoeGroupedMatmul")
    def _grouped_matmul_grad(op, grad):
        rows, kernel, group_sizes = op.inputs
        transpose = op.get_attr("transpose_kernel")
        # out_e = rows_e @ K_e: d rows_e = grad_e @ K_e^T, dK_e = rows_e^T grad_e.
        # (Transposed, out_e = rows_e @ K_e^T: d rows_e = grad_e @ K_e,
        # dK_e = grad_e^T rows_e.)
        d_rows = lib.tf_moe_grouped_matmul(
            grad, kernel, group_sizes, transpose_kernel=not transpose
        )
        if transpose:
            d_kernel = lib.tf_moe_grouped_matmul_kernel_grad(grad, rows, group_sizes)
        else:
            d_kernel = lib.tf_moe_grouped_matmul_kernel_grad(rows, grad, group_sizes)
        return [d_rows, d_kernel, None]


LIBRARY = NativeLibrary(
    feature="grouped_matmul(implementation='custom_call')",
    alternative="implementation='ragged_dot' or 'reference'",
    package="cc_dropless",
    tf_library=DROPLESS_TF_LIBRARY,
    host_library=DROPLESS_LIBRARY,
    cuda_library=DROPLESS_CUDA_LIBRARY,
    # XLA FFI targets and their handler symbols (without the platform suffix).
    targets={
        "tf_moe_grouped_matmul": "TfMoeGroupedMatmul",
        "tf_moe_grouped_matmul_kernel_grad": "TfMoeGroupedMatmulKernelGrad",
        "tf_moe_grouped_matmul_bias": "TfMoeGroupedMatmulBias",
    },
    # d rows and d kernel in one call (saves a stream synchronization on GPUs).
    cuda_targets={"tf_moe_grouped_matmul_grad": "TfMoeGroupedMatmulGrad"},
    build_hint=BUILD_HINT,
    register_tf_gradients=_register_tf_gradients,
)
require_available = LIBRARY.require_available
is_available = LIBRARY.is_available


# ---------------------------------------------------------------------------
# TensorFlow.


def _tf_call(rows, kernel, group_sizes):
    import tensorflow as tf

    return LIBRARY.tf_ops().tf_moe_grouped_matmul(
        rows, kernel, tf.cast(group_sizes, tf.int32)
    )


# ---------------------------------------------------------------------------
# JAX.


def _jax_ffi_grouped_matmul(rows, kernel, group_sizes, transpose_kernel=False):
    """The FFI call: rows [N, a], kernel [E, a, b] ([E, b, a] transposed),
    group_sizes <int32>[E] -> [N, b]. No gradient."""
    import jax
    import numpy as np

    LIBRARY.register_jax()
    out_dim = kernel.shape[1] if transpose_kernel else kernel.shape[2]
    return jax_ffi_call(
        "tf_moe_grouped_matmul", jax.ShapeDtypeStruct((rows.shape[0], out_dim), rows.dtype),
        rows, kernel, group_sizes, transpose_kernel=np.int64(transpose_kernel),
    )


def _jax_ffi_kernel_grad(rows, grad, group_sizes):
    """The FFI call: rows [N, a], grad [N, b], group_sizes <int32>[E] ->
    [E, a, b] = rows_e^T grad_e per segment. No gradient."""
    import jax

    LIBRARY.register_jax()
    shape = (group_sizes.shape[0], rows.shape[1], grad.shape[1])
    return jax_ffi_call(
        "tf_moe_grouped_matmul_kernel_grad", jax.ShapeDtypeStruct(shape, rows.dtype),
        rows, grad, group_sizes,
    )


def _jax_grouped_matmul_grads(rows, kernel, group_sizes, grad):
    """d rows [N, a] and d kernel [E, a, b] of out = grouped(rows, kernel)
    for the cotangent grad [N, b]."""
    import jax

    grad = grad.astype(rows.dtype)
    if jax_platform() == "gpu":
        # One call for both (one read of group_sizes; the GEMMs of both
        # run together over the CUDA streams).
        return jax_ffi_call(
            "tf_moe_grouped_matmul_grad",
            (jax.ShapeDtypeStruct(rows.shape, rows.dtype),
             jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)),
            rows, kernel, grad, group_sizes,
        )
    d_rows = _jax_ffi_grouped_matmul(grad, kernel, group_sizes, transpose_kernel=True)
    return d_rows, _jax_ffi_kernel_grad(rows, grad, group_sizes)


@functools.lru_cache(maxsize=None)
def _jax_grouped_matmul():
    """The custom-call grouped matmul with its VJP (JAX)."""
    import jax
    import numpy as np

    @jax.custom_vjp
    def grouped(rows, kernel, group_sizes):
        return _jax_ffi_grouped_matmul(rows, kernel, group_sizes)

    def grouped_fwd(rows, kernel, group_sizes):
        return _jax_ffi_grouped_matmul(rows, kernel, group_sizes), (rows, kernel, group_sizes)

    def grouped_bwd(residuals, grad):
        rows, kernel, group_sizes = residuals
        d_rows, d_kernel = _jax_grouped_matmul_grads(rows, kernel, group_sizes, grad)
        return d_rows, d_kernel, np.zeros(group_sizes.shape, jax.dtypes.float0)

    grouped.defvjp(grouped_fwd, grouped_bwd)
    return grouped


# The activations the FFI call fuses after its bias (its `activation` attribute).
FUSED_ACTIVATIONS = {None: 0, "relu": 1}


def _jax_ffi_grouped_matmul_bias(rows, kernel, bias, group_sizes, activation):
    """The FFI call: act(rows_e @ K_e + bias_e) per segment, [N, b] (0 past
    the last segment). No gradient."""
    import jax
    import numpy as np

    LIBRARY.register_jax()
    return jax_ffi_call(
        "tf_moe_grouped_matmul_bias",
        jax.ShapeDtypeStruct((rows.shape[0], kernel.shape[2]), rows.dtype),
        rows, kernel, bias, group_sizes,
        activation=np.int64(FUSED_ACTIVATIONS[activation]),
    )


@functools.lru_cache(maxsize=None)
def _jax_grouped_matmul_bias(activation):
    """The fused custom call with its VJP (JAX), for one activation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.custom_vjp
    def fused(rows, kernel, bias, group_sizes, expert):
        return _jax_ffi_grouped_matmul_bias(rows, kernel, bias, group_sizes, activation)

    def fused_fwd(rows, kernel, bias, group_sizes, expert):
        out = _jax_ffi_grouped_matmul_bias(rows, kernel, bias, group_sizes, activation)
        return out, (rows, kernel, group_sizes, expert, out)

    def fused_bwd(residuals, grad):
        rows, kernel, group_sizes, expert, out = residuals
        grad = grad.astype(rows.dtype)
        if activation == "relu":
            # relu' from the output: out > 0 exactly where the pre-activation is.
            grad = jnp.where(out > 0, grad, jnp.zeros_like(grad))  # [N, b]
        num_experts = kernel.shape[0]
        # d bias_e = the sum of segment e's rows of grad: a one-hot matmul
        # (see `tf_moe.layers.experts._row_bias` for why not a scatter); rows
        # past the last segment have expert E and drop out. HIGHEST: a float32
        # sum, not TF32's (GPUs' default for float32 dots, ~1e-3 off).
        onehot = jax.nn.one_hot(expert, num_experts, dtype=grad.dtype)  # [N, E]
        d_bias = jnp.einsum(
            "ne,nb->eb", onehot, grad, preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        ).astype(rows.dtype)
        d_rows, d_kernel = _jax_grouped_matmul_grads(rows, kernel, group_sizes, grad)
        zero = np.zeros(group_sizes.shape, jax.dtypes.float0)
        return d_rows, d_kernel, d_bias, zero, np.zeros(expert.shape, jax.dtypes.float0)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


def _jax_call(rows, kernel, group_sizes):
    import jax.numpy as jnp

    return _jax_grouped_matmul()(rows, kernel, jnp.asarray(group_sizes, jnp.int32))


# ---------------------------------------------------------------------------
# Public API.

_CUSTOM_CALLS = {"tensorflow": _tf_call, "jax": _jax_call}


def resolve_implementation(implementation):
    """The implementation `implementation` names ("auto": "custom_call" where
    `is_available()`, else "ragged_dot" on JAX, else "reference").

    Raises:
        ValueError: an unknown name, or "ragged_dot" without JAX.
    """
    if implementation not in GROUPED_MATMUL_IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {GROUPED_MATMUL_IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )
    jax_backend = keras.backend.backend() == "jax"
    if implementation == "ragged_dot" and not jax_backend:
        raise ValueError(
            "grouped_matmul(implementation='ragged_dot') needs the JAX "
            f"backend. Received: backend {keras.backend.backend()!r}; use "
            "'custom_call' or 'reference'."
        )
    if implementation != "auto":
        return implementation
    if is_available():
        return "custom_call"
    return "ragged_dot" if jax_backend else "reference"


def grouped_matmul(rows, kernel, layout, implementation="auto"):
    """out[r] = rows[r] @ kernel[expert(r)], with gradients.

    Args:
        rows: [N, a] float32, bfloat16 or float16 rows sorted by expert.
        kernel: [E, a, b], cast to the dtype of `rows`.
        layout: a `tf_moe.ops.dropless.DroplessLayout` with `num_rows` N.
        implementation: "auto" (default: "custom_call" where `is_available()`,
            else "ragged_dot" on JAX, else "reference"), "custom_call"
            (TensorFlow on CPU; JAX on CPU or CUDA GPUs), "ragged_dot" (JAX) or "reference".

    Returns:
        [N, b] of the dtype of `rows`; 0 for rows past the last segment.
        The custom call accumulates in float32 and rounds once.

    Raises:
        ValueError: unknown `implementation`, or "ragged_dot" off JAX.
        CustomCallUnavailableError: "custom_call" where the library is not
            built or cannot run (the message says how to build it).
    """
    num_experts, a, b = kernel.shape
    implementation = resolve_implementation(implementation)
    kernel = ops.cast(kernel, rows.dtype)
    if implementation == "custom_call":
        require_available()
        return _CUSTOM_CALLS[keras.backend.backend()](rows, kernel, layout.group_sizes)
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


def grouped_matmul_bias(rows, kernel, bias, layout, activation=None,
                        implementation="auto"):
    """act(rows[r] @ kernel[e(r)] + bias[e(r)]), with gradients: the first
    layer of the dropless expert FFN in one op.

    On JAX with the custom call, one FFI call computes it with the bias and
    the activation in the GEMM's epilogue (on Hopper GPUs, the CUTLASS
    kernel's; on other GPUs and CPUs, a pass after the GEMMs), so the
    pre-activation [N, b] is never written; the gradient takes relu' from
    the output. Elsewhere (TensorFlow, "ragged_dot", "reference") it is
    `grouped_matmul`, a bias and the activation, the same function.

    Args:
        rows: [N, a] float32, bfloat16 or float16 rows sorted by expert.
        kernel: [E, a, b]; bias: [E, b]; both cast to the dtype of `rows`.
        layout: a `tf_moe.ops.dropless.DroplessLayout` with `num_rows` N.
        activation: None or one of `FUSED_ACTIVATIONS` ("relu").
        implementation: as for `grouped_matmul`.

    Returns:
        [N, b] of the dtype of `rows`; 0 for rows past the last segment.

    Raises:
        ValueError: unknown `activation` or `implementation`, or a `bias`
            that is not [E, b].
        CustomCallUnavailableError: as for `grouped_matmul`.
    """
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {tuple(FUSED_ACTIVATIONS)}. "
            f"Received: activation={activation!r}"
        )
    num_experts, a, b = kernel.shape
    if tuple(bias.shape) != (num_experts, b):
        raise ValueError(
            f"`bias` must be [E, b] = [{num_experts}, {b}] for a kernel of "
            f"shape {tuple(kernel.shape)}. Received: bias.shape={tuple(bias.shape)}"
        )
    implementation = resolve_implementation(implementation)
    kernel = ops.cast(kernel, rows.dtype)
    bias = ops.cast(bias, rows.dtype)
    if implementation == "custom_call" and keras.backend.backend() == "jax":
        import jax.numpy as jnp

        require_available()
        return _jax_grouped_matmul_bias(activation)(
            rows, kernel, bias, jnp.asarray(layout.group_sizes, jnp.int32),
            row_expert(layout),
        )
    out = grouped_matmul(rows, kernel, layout, implementation)
    # bias [E, b] -> each row's, 0 past the last segment (a one-hot matmul,
    # see `tf_moe.layers.experts._row_bias`).
    onehot = ops.one_hot(row_expert(layout), num_experts, dtype=out.dtype)  # [N, E]
    out = out + ops.matmul(onehot, bias)
    return ops.relu(out) if activation == "relu" else out
