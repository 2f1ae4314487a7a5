"""Custom-call dispatch and combine: XLA custom calls into the Bazel-built
C++ (CPU) and CUDA (GPU) library in `tf_moe/ops/cc`, with gradients.

Computes the same function of a `Routing` as the pure paths in
`tf_moe.ops.dispatch` (fused permute/unpermute, O(S * k * d) work):

    dispatch: expert_inputs[e, g, c] = x[g, s] for the routed choice (g, s, j)
              with expert_index = e and position = c; 0 for empty slots.
    combine:  y[g, s] = sum_j [routed] combine_weight[g, s, j] *
              expert_outputs[expert_index[g, s, j], g, position[g, s, j]].

Gradients flow to `x`, to the expert outputs and to `combine_weight` (0 for
choices that are not routed, as on the gather path).

Backends:
- TensorFlow: `tf.load_op_library(libtf_moe_ops.so)`; CPU kernels in eager and
  graph mode, XLA lowering to typed FFI custom calls under `jit_compile=True`;
  gradients via `tf.RegisterGradient`. CPU only.
- JAX: `jax.ffi.ffi_call` on the handlers of `libtf_moe_ffi.so` (CPU) or
  `libtf_moe_ffi_cuda.so` (CUDA), gradients via `jax.custom_vjp`.

The libraries are found and loaded by `tf_moe.ops.library` (`LIBRARY`).
Build them with `bazel build //tf_moe/ops/cc:all` (CUDA: `bazel build
//tf_moe/ops/cc:libtf_moe_ffi_cuda.so`, needs nvcc).

Owns: the calls and their gradients. Does not own: the math
(`cc/dispatch_core.h`, `cc/dispatch_kernels.cu.cc`), loading
(`tf_moe.ops.library`), routing.

Shape letters: G groups, S tokens per group, d model dim, E experts,
C capacity, k choices per token.
"""

import functools
import math

import keras

from tf_moe.ops.library import (
    LIBRARY_DIR_ENV,
    CustomCallUnavailableError,
    NativeLibrary,
)

FFI_LIBRARY = "libtf_moe_ffi.so"
CUDA_LIBRARY = "libtf_moe_ffi_cuda.so"
TF_LIBRARY = "libtf_moe_ops.so"
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

BUILD_HINT = (
    "Build the custom-call library from the repository root with "
    "`bazel build //tf_moe/ops/cc:all` (add --repo_env=TF_MOE_PYTHON=$(which "
    "python) to pick the Python whose TensorFlow to build against; for CUDA "
    "also `bazel build //tf_moe/ops/cc:libtf_moe_ffi_cuda.so`), or set "
    f"{LIBRARY_DIR_ENV} to a directory holding {TF_LIBRARY}, {FFI_LIBRARY} "
    f"and {CUDA_LIBRARY}."
)


def _register_tf_gradients(lib):
    import tensorflow as tf

    @tf.RegisterGradient("TfMoeDispatch")
    def _dispatch_grad(op, grad):
        expert_index, position, dispatch_mask = op.inputs[1:4]
        # The adjoint of dispatch is combine with weight 1 on routed choices.
        grad_x = lib.tf_moe_combine(
            grad,
            expert_index,
            position,
            dispatch_mask,
            tf.cast(dispatch_mask, tf.float32),
            num_experts=op.get_attr("num_experts"),
            capacity=op.get_attr("capacity"),
        )
        return [grad_x, None, None, None]

    @tf.RegisterGradient("TfMoeCombine")
    def _combine_grad(op, grad):
        grad_y, grad_weight = lib.tf_moe_combine_grad(
            grad,
            *op.inputs,
            num_experts=op.get_attr("num_experts"),
            capacity=op.get_attr("capacity"),
        )
        return [grad_y, None, None, None, grad_weight]


LIBRARY = NativeLibrary(
    feature="dispatch='custom_call'",
    alternative="dispatch='gather'",
    package="cc",
    tf_library=TF_LIBRARY,
    host_library=FFI_LIBRARY,
    cuda_library=CUDA_LIBRARY,
    # XLA FFI targets and the handler symbols that implement them.
    targets={
        "tf_moe_dispatch": "TfMoeDispatch",
        "tf_moe_combine": "TfMoeCombine",
        "tf_moe_combine_grad": "TfMoeCombineGrad",
    },
    build_hint=BUILD_HINT,
    register_tf_gradients=_register_tf_gradients,
)
require_available = LIBRARY.require_available
is_available = LIBRARY.is_available


# ---------------------------------------------------------------------------
# TensorFlow.


def _tf_routing(routing):
    import tensorflow as tf

    return (
        tf.cast(routing.expert_index, tf.int32),
        tf.cast(routing.position, tf.int32),
        tf.cast(routing.dispatch_mask, tf.bool),
    )


def _tf_dispatch(x, routing):
    return LIBRARY.tf_ops().tf_moe_dispatch(
        x,
        *_tf_routing(routing),
        num_experts=routing.num_experts,
        capacity=routing.capacity,
    )


def _tf_combine(expert_outputs, routing):
    import tensorflow as tf

    return LIBRARY.tf_ops().tf_moe_combine(
        expert_outputs,
        *_tf_routing(routing),
        tf.cast(routing.combine_weight, tf.float32),
        num_experts=routing.num_experts,
        capacity=routing.capacity,
    )


# ---------------------------------------------------------------------------
# JAX.


# Largest num_experts and capacity (kMaxRoutingAttr of cc/dispatch_core.h):
# expert_index and position are int32.
MAX_ROUTING_ATTR = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _check_routing_attr(name, value, index_name):
    if not 1 <= value <= MAX_ROUTING_ATTR:
        raise ValueError(
            f"tf_moe: `{name}` must be in [1, {MAX_ROUTING_ATTR}] (`{index_name}` "
            f"is int32). Received: {name}={value}"
        )


def jax_ffi_call(target, results, *args, **attributes):
    """`jax.ffi.ffi_call(target, results)(*args, **attributes)` plus what the
    C++ handlers cannot do themselves, as they run only after XLA has made
    the call: a result that cannot fit in int64 raises ValueError here
    (jaxlib aborts the process on such a shape), and a call with a result of
    no elements is marked as having side effects (XLA drops it otherwise, and
    with it the handler's checks of the routing or group sizes)."""
    import jax
    import numpy as np

    empty = False
    for result in results if isinstance(results, (tuple, list)) else (results,):
        size = math.prod(result.shape)  # a Python int: no overflow here
        itemsize = np.dtype(result.dtype).itemsize
        if min(result.shape, default=0) < 0 or size * itemsize > _INT64_MAX:
            raise ValueError(
                f"tf_moe: the result of {target} must have dimensions >= 0 and "
                "fit in int64: at most 2**63 - 1 elements and bytes "
                f"({itemsize} bytes each). Received: shape={tuple(result.shape)}"
            )
        empty = empty or size == 0
    return jax.ffi.ffi_call(target, results, has_side_effect=empty)(
        *args, **attributes
    )


def _ffi(target, results, *args, num_experts, capacity):
    import numpy as np

    _check_routing_attr("num_experts", num_experts, "expert_index")
    _check_routing_attr("capacity", capacity, "position")
    LIBRARY.register_jax()
    return jax_ffi_call(
        target, results, *args, num_experts=np.int64(num_experts),
        capacity=np.int64(capacity),
    )


@functools.lru_cache(maxsize=None)
def _jax_functions():
    """(dispatch, combine) with custom VJPs."""
    import jax
    import jax.numpy as jnp

    def ffi_dispatch(x, expert_index, position, mask, num_experts, capacity):
        g, _, d = x.shape
        out = jax.ShapeDtypeStruct((num_experts, g, capacity, d), x.dtype)
        return _ffi(
            "tf_moe_dispatch", out, x, expert_index, position, mask,
            num_experts=num_experts, capacity=capacity,
        )

    def ffi_combine(y, expert_index, position, mask, weight, num_experts, capacity):
        g, s, _ = expert_index.shape
        out = jax.ShapeDtypeStruct((g, s, y.shape[-1]), y.dtype)
        return _ffi(
            "tf_moe_combine", out, y, expert_index, position, mask, weight,
            num_experts=num_experts, capacity=capacity,
        )

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def dispatch(x, expert_index, position, mask, num_experts, capacity):
        return ffi_dispatch(x, expert_index, position, mask, num_experts, capacity)

    def dispatch_fwd(x, expert_index, position, mask, num_experts, capacity):
        out = ffi_dispatch(x, expert_index, position, mask, num_experts, capacity)
        return out, (expert_index, position, mask)

    def dispatch_bwd(num_experts, capacity, residuals, grad):
        expert_index, position, mask = residuals
        # The adjoint of dispatch is combine with weight 1 on routed choices.
        grad_x = ffi_combine(
            grad, expert_index, position, mask, mask.astype(jnp.float32),
            num_experts, capacity,
        )
        return grad_x, None, None, None

    dispatch.defvjp(dispatch_fwd, dispatch_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def combine(y, expert_index, position, mask, weight, num_experts, capacity):
        return ffi_combine(y, expert_index, position, mask, weight, num_experts, capacity)

    def combine_fwd(y, expert_index, position, mask, weight, num_experts, capacity):
        out = ffi_combine(y, expert_index, position, mask, weight, num_experts, capacity)
        return out, (y, expert_index, position, mask, weight)

    def combine_bwd(num_experts, capacity, residuals, grad):
        y, expert_index, position, mask, weight = residuals
        results = (
            jax.ShapeDtypeStruct(y.shape, y.dtype),
            jax.ShapeDtypeStruct(weight.shape, jnp.float32),
        )
        grad_y, grad_weight = _ffi(
            "tf_moe_combine_grad", results, grad.astype(y.dtype), y,
            expert_index, position, mask, weight,
            num_experts=num_experts, capacity=capacity,
        )
        return grad_y, None, None, None, grad_weight

    combine.defvjp(combine_fwd, combine_bwd)
    return dispatch, combine


def _jax_routing(routing):
    import jax.numpy as jnp

    return (
        jnp.asarray(routing.expert_index, jnp.int32),
        jnp.asarray(routing.position, jnp.int32),
        jnp.asarray(routing.dispatch_mask, jnp.bool_),
    )


def _jax_dispatch(x, routing):
    dispatch, _ = _jax_functions()
    return dispatch(x, *_jax_routing(routing), routing.num_experts, routing.capacity)


def _jax_combine(expert_outputs, routing):
    import jax.numpy as jnp

    _, combine = _jax_functions()
    weight = jnp.asarray(routing.combine_weight, jnp.float32)
    return combine(
        expert_outputs, *_jax_routing(routing), weight,
        routing.num_experts, routing.capacity,
    )


# ---------------------------------------------------------------------------
# Public API.

_BACKENDS = {
    "tensorflow": (_tf_dispatch, _tf_combine),
    "jax": (_jax_dispatch, _jax_combine),
}


def _backend_functions():
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise CustomCallUnavailableError(
            "dispatch='custom_call' supports the 'tensorflow' and 'jax' Keras "
            f"backends. Received: backend={backend!r}"
        )
    return _BACKENDS[backend]


def _check_dtype(name, tensor):
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"`{name}` must have dtype in {SUPPORTED_DTYPES} for "
            f"dispatch='custom_call'. Received: {name}.dtype={dtype}"
        )


def custom_call_dispatch(x, routing):
    """Dispatch with the custom call. x: [G, S, d] -> [E, G, C, d].

    Args:
        x: [G, S, d] tokens, float32, bfloat16 or float16.
        routing: a `tf_moe.routing.Routing`.

    Returns:
        [E, G, C, d] expert inputs, dtype of `x`; 0 in empty slots.

    Raises:
        CustomCallUnavailableError: the library is not built or cannot run.
        ValueError: unsupported dtype.
    """
    _check_dtype("x", x)
    return _backend_functions()[0](x, routing)


def custom_call_combine(expert_outputs, routing):
    """Combine with the custom call. [E, G, C, d] -> [G, S, d].

    Accumulates in float32; the result has the dtype of `expert_outputs`.
    """
    _check_dtype("expert_outputs", expert_outputs)
    return _backend_functions()[1](expert_outputs, routing)
