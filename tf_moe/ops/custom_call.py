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

The libraries are searched, in order, in `$TF_MOE_OPS_DIR`, next to this
module (`tf_moe/ops/cc/`, e.g. in Bazel runfiles), and outside Bazel tests in
the checkout's `bazel-bin/tf_moe/ops/cc/`. Build them with
`bazel build //tf_moe/ops/cc:all` (CUDA: `bazel build
//tf_moe/ops/cc:libtf_moe_ffi_cuda.so`, needs nvcc).

Owns: loading and registering the library, the gradients. Does not own: the
math (`cc/dispatch_core.h`, `cc/dispatch_kernels.cu.cc`), routing.

Shape letters: G groups, S tokens per group, d model dim, E experts,
C capacity, k choices per token.
"""

import functools
import os

import keras

LIBRARY_DIR_ENV = "TF_MOE_OPS_DIR"
FFI_LIBRARY = "libtf_moe_ffi.so"
CUDA_LIBRARY = "libtf_moe_ffi_cuda.so"
TF_LIBRARY = "libtf_moe_ops.so"
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# XLA FFI targets and the handler symbols (per platform) that implement them.
_TARGETS = {
    "tf_moe_dispatch": "TfMoeDispatch",
    "tf_moe_combine": "TfMoeCombine",
    "tf_moe_combine_grad": "TfMoeCombineGrad",
}

BUILD_HINT = (
    "Build the custom-call library from the repository root with "
    "`bazel build //tf_moe/ops/cc:all` (add --repo_env=TF_MOE_PYTHON=$(which "
    "python) to pick the Python whose TensorFlow to build against; for CUDA "
    "also `bazel build //tf_moe/ops/cc:libtf_moe_ffi_cuda.so`), or set "
    f"{LIBRARY_DIR_ENV} to a directory holding {TF_LIBRARY}, {FFI_LIBRARY} "
    f"and {CUDA_LIBRARY}."
)


class CustomCallUnavailableError(RuntimeError):
    """The custom-call library is not built or cannot run here."""


def library_dirs(package="cc"):
    """Directories searched for the libraries of `tf_moe/ops/<package>`, in
    order: $TF_MOE_OPS_DIR, `tf_moe/ops/<package>/` next to this module (e.g.
    Bazel runfiles) and, outside Bazel tests, the checkout's
    `bazel-bin/tf_moe/ops/<package>/`."""
    dirs = []
    if os.environ.get(LIBRARY_DIR_ENV):
        dirs.append(os.environ[LIBRARY_DIR_ENV])
    here = os.path.dirname(os.path.abspath(__file__))
    dirs.append(os.path.join(here, package))
    if "TEST_SRCDIR" not in os.environ:  # not inside a (hermetic) Bazel test
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        dirs.append(os.path.join(root, "bazel-bin", "tf_moe", "ops", package))
    return dirs


def find_library(name, dirs=None):
    """Path of library `name` in `dirs` (default `library_dirs()`), or None."""
    for directory in library_dirs() if dirs is None else dirs:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _require_library(name):
    path = find_library(name)
    if path is None:
        raise CustomCallUnavailableError(
            f"dispatch='custom_call' needs {name}, which was not found in "
            f"{library_dirs()}. {BUILD_HINT}"
        )
    return path


# ---------------------------------------------------------------------------
# TensorFlow.


def load_tf_op_library(find_path, feature, alternative, build_hint):
    """`tf.load_op_library` of the path `find_path()` returns, for the TF op
    libraries of tf_moe (CPU kernels only).

    Raises:
        CustomCallUnavailableError: TensorFlow sees a GPU, the library is
            missing (from `find_path`), or it does not load (built against
            another TensorFlow); the message names `feature`, the
            `alternative` to use and how to build (`build_hint`).
    """
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        raise CustomCallUnavailableError(
            f"{feature} on the TensorFlow backend has CPU kernels only, and "
            f"TensorFlow sees a GPU. Use {alternative}, or the JAX backend "
            "for the CUDA kernels."
        )
    path = find_path()
    try:
        return tf.load_op_library(path)
    except tf.errors.NotFoundError as error:
        raise CustomCallUnavailableError(
            f"{path} does not load into TensorFlow {tf.__version__} (built "
            f"against another TensorFlow?): {error}. {build_hint}"
        ) from error


@functools.lru_cache(maxsize=None)
def _tf_ops():
    """The loaded TF op library; registers the gradients (once)."""
    import tensorflow as tf

    lib = load_tf_op_library(
        lambda: _require_library(TF_LIBRARY), "dispatch='custom_call'",
        "dispatch='gather'", BUILD_HINT,
    )

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

    return lib


def _tf_routing(routing):
    import tensorflow as tf

    return (
        tf.cast(routing.expert_index, tf.int32),
        tf.cast(routing.position, tf.int32),
        tf.cast(routing.dispatch_mask, tf.bool),
    )


def _tf_dispatch(x, routing):
    return _tf_ops().tf_moe_dispatch(
        x,
        *_tf_routing(routing),
        num_experts=routing.num_experts,
        capacity=routing.capacity,
    )


def _tf_combine(expert_outputs, routing):
    import tensorflow as tf

    return _tf_ops().tf_moe_combine(
        expert_outputs,
        *_tf_routing(routing),
        tf.cast(routing.combine_weight, tf.float32),
        num_experts=routing.num_experts,
        capacity=routing.capacity,
    )


# ---------------------------------------------------------------------------
# JAX.


def _jax_platform():
    import jax

    return jax.default_backend()


@functools.lru_cache(maxsize=None)
def _jax_register(platform):
    """Registers the FFI targets for `platform` ("cpu" or "gpu"), once."""
    import ctypes

    import jax

    if platform == "cpu":
        library, suffix, xla_platform = FFI_LIBRARY, "Host", "cpu"
    elif platform == "gpu":
        library, suffix, xla_platform = CUDA_LIBRARY, "Cuda", "CUDA"
    else:
        raise CustomCallUnavailableError(
            "dispatch='custom_call' runs on CPU and CUDA GPUs. Received: JAX "
            f"platform {platform!r}. Use dispatch='einsum' or 'gather'."
        )
    lib = ctypes.cdll.LoadLibrary(_require_library(library))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target,
            jax.ffi.pycapsule(getattr(lib, symbol + suffix)),
            platform=xla_platform,
        )
    return True


def _ffi(target, results, *args, num_experts, capacity):
    import jax
    import numpy as np

    _jax_register(_jax_platform())
    return jax.ffi.ffi_call(target, results)(
        *args, num_experts=np.int64(num_experts), capacity=np.int64(capacity)
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


def require_available():
    """Loads and registers the library for the current backend and device.

    Raises:
        CustomCallUnavailableError: with the reason and how to build it.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_ops()
    elif backend == "jax":
        _jax_register(_jax_platform())
    else:
        _backend_functions()


@functools.lru_cache(maxsize=None)
def _available(backend, platform):
    del backend, platform  # cache keys
    try:
        require_available()
    except CustomCallUnavailableError:
        return False
    return True


def is_available():
    """Whether dispatch='custom_call' can run with the current Keras backend
    on its default device (the library is built, loads, and has kernels for
    the device)."""
    backend = keras.backend.backend()
    platform = _jax_platform() if backend == "jax" else None
    return _available(backend, platform)


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
