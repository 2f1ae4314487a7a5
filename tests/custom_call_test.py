"""Tests for tf_moe.ops.custom_call: the Bazel-built XLA custom-call path.

The custom call must compute the same function of a `Routing` as the pure
paths (formulas written out in numpy below, and the einsum path):

    dispatch: expert_inputs[e, g, c] = x[g, s] for the routed choice (g, s, j)
              with expert_index = e and position = c; 0 for empty slots.
    combine:  y[g, s] = sum_j [routed] combine_weight[g, s, j] *
              expert_outputs[expert_index[g, s, j], g, position[g, s, j]].

Checked in value and in gradient (x, expert outputs, combine_weight) eagerly
(TF: the CPU kernels; JAX: op-by-op), in a TF graph (CPU kernels) and compiled
(tf.function(jit_compile=True) / jax.jit: the typed XLA FFI handlers), for float32, bfloat16 and float16; on
thousands of random routings (one expert for all, empty experts, capacity 1,
k = E, tied weights, garbage indices where not routed); through `model.fit`;
and out-of-range indices must raise, not crash (also with d = 0, where no
data moves and XLA would drop a call without side effects). Bad attributes
(num_experts, capacity outside [1, 2**31 - 1]) and outputs too large for int64
must raise an error naming them, in every mode, never abort the process.

The gradient w.r.t. combine_weight is compared on routed choices only: there
the einsum path's one-hot tensor gives the same value; on choices that are not
routed the custom call (like the gather path) returns exactly 0.

Shape letters: G groups, S tokens per group, d model dim, E experts,
C capacity, k choices per token.
"""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

import tf_moe
from tf_moe.ops import custom_call, library
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.ops.plan import resolve_plan
from tf_moe.routing import ExpertChoiceRouter, Routing, TopKRouter

BACKEND = keras.backend.backend()
DTYPES = ("float32", "bfloat16", "float16")
# Relative tolerance of a comparison in each dtype (einsum rounds the combine
# weights to the dtype and may accumulate in it; the custom call accumulates
# in float32).
RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float32)


def assert_close(test, actual, expected, dtype, msg=""):
    """Elementwise |a - e| <= rtol * (|e| + max|e|) (scale-aware for sums)."""
    actual, expected = to_numpy(actual), np.asarray(expected, np.float32)
    test.assertEqual(actual.shape, expected.shape, msg)
    test.assertFalse(np.isnan(actual).any(), msg)
    scale = np.abs(expected) + np.abs(expected).max(initial=1e-30)
    bad = np.abs(actual - expected) > RTOL[dtype] * scale
    test.assertFalse(
        bad.any(),
        f"{msg}: {bad.sum()} of {bad.size} differ; max |diff| "
        f"{np.abs(actual - expected).max()}",
    )


# ----------------------------------------------------------------------------
# Backend helpers: compile and differentiate.


def compiled(fn, mode):
    """fn itself ("eager"), a TF graph without XLA ("graph"; JAX: jax.jit), or
    compiled with XLA ("jit")."""
    if mode == "eager":
        return fn
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=mode == "jit")
    import jax

    return jax.jit(fn)


def value_and_grads(fn, args, cotangent):
    """(fn(*args), gradients of sum(fn(*args) * cotangent) w.r.t. args)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            out = fn(*args)
            loss = tf.reduce_sum(tf.cast(out, tf.float32) * cotangent)
        return out, tape.gradient(loss, args)
    import jax
    import jax.numpy as jnp

    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jnp.asarray(cotangent, out.dtype))


# ----------------------------------------------------------------------------
# Random routings (numpy) that respect the `Routing` contract.

MODES = ("random", "one_expert", "empty_experts", "tied", "prioritized")


def random_routings(rng, groups, group_size, k, num_experts, capacity):
    """One independent random routing per group, cycling through MODES.

    random: k distinct experts per token, requested with probability 0.9.
    one_expert: every token's first choice is expert 0.
    empty_experts: only max(k, E // 2) experts are ever chosen.
    tied: every routed choice gets the same combine weight.
    prioritized: capacity filled in a random token order (as with batch
        prioritized routing), not token order.
    Choices beyond capacity are dropped (GShard: rank-major, then token order);
    choices that are not routed get garbage expert/position in [-1, E]/[-1, C].

    Returns:
        (expert_index, position, dispatch_mask, combine_weight) numpy arrays.
    """
    shape = (groups, group_size, k)
    mode = np.array([MODES[g % len(MODES)] for g in range(groups)])[:, None, None]
    scores = rng.random((groups, group_size, num_experts))
    # Shape: [G, 1, E]; experts outside the allowed half are never chosen.
    allowed = np.argsort(rng.random((groups, 1, num_experts)), -1) < max(
        k, num_experts // 2
    )
    scores = np.where((mode == "empty_experts") & ~allowed, -1.0, scores)
    scores[..., 0] = np.where(mode[..., 0] == "one_expert", 2.0, scores[..., 0])
    expert_index = np.argsort(-scores, axis=-1)[..., :k].astype(np.int32)
    requested = rng.random(shape) < 0.9
    # Slot order: rank-major, then token order (or a random token order).
    order = np.where(
        mode[..., 0] == "prioritized",
        np.argsort(rng.random((groups, group_size)), -1),
        np.arange(group_size)[None],
    )  # [G, S]: the token in each priority place
    ranked = np.take_along_axis(expert_index, order[..., None], 1)  # [G, S, k]
    ranked_req = np.take_along_axis(requested, order[..., None], 1)
    onehot = (ranked[..., None] == np.arange(num_experts)) & ranked_req[..., None]
    onehot = onehot.transpose(0, 2, 1, 3).reshape(groups, k * group_size, -1)
    count = (np.cumsum(onehot, axis=1) - 1) * onehot  # [G, k * S, E]
    ranked_pos = count.sum(-1).reshape(groups, k, group_size).transpose(0, 2, 1)
    position = np.empty_like(ranked_pos)
    np.put_along_axis(position, order[..., None], ranked_pos, 1)
    mask = requested & (position < capacity)
    weight = np.where(mode == "tied", 0.5, rng.uniform(0.05, 1.0, shape))
    weight = np.where(mask, weight, 0.0).astype(np.float32)
    garbage_e = rng.integers(-1, num_experts + 1, shape)
    garbage_c = rng.integers(-1, capacity + 1, shape)
    expert_index = np.where(mask, expert_index, garbage_e).astype(np.int32)
    position = np.where(mask, position, garbage_c).astype(np.int32)
    return expert_index, position, mask, weight


def make_routing(expert_index, position, mask, weight, num_experts, capacity):
    return Routing(
        expert_index=ops.convert_to_tensor(expert_index, "int32"),
        position=ops.convert_to_tensor(position, "int32"),
        dispatch_mask=ops.convert_to_tensor(mask, "bool"),
        combine_weight=ops.convert_to_tensor(weight, "float32"),
        requested_mask=ops.convert_to_tensor(mask, "bool"),
        token_mask=ops.convert_to_tensor(np.ones(mask.shape[:2], bool)),
        router_probs=None,
        aux_losses={},
        num_experts=num_experts,
        capacity=capacity,
    )


def reference_dispatch(x, expert_index, position, mask, num_experts, capacity):
    """Numpy loop over routed choices (formula in the module docstring)."""
    groups, group_size, k = mask.shape
    out = np.zeros((num_experts, groups, capacity, x.shape[-1]), np.float32)
    for g, s, j in zip(*np.nonzero(mask)):
        out[expert_index[g, s, j], g, position[g, s, j]] = x[g, s]
    return out


def reference_combine(y, expert_index, position, mask, weight):
    out = np.zeros(mask.shape[:2] + (y.shape[-1],), np.float32)
    for g, s, j in zip(*np.nonzero(mask)):
        out[g, s] += weight[g, s, j] * y[expert_index[g, s, j], g, position[g, s, j]]
    return out


def path_functions(path, num_experts, capacity):
    """(dispatch(x, idx, pos, mask), combine(y, idx, pos, mask, w)) of `path`."""
    dispatch, combine = dispatch_lib.DISPATCHERS[path]

    def routing(idx, pos, mask, w=None):
        if w is None:
            w = ops.cast(mask, "float32")
        return Routing(idx, pos, mask, w, mask, None, None, {}, num_experts, capacity)

    return (
        lambda x, idx, pos, mask: dispatch(x, routing(idx, pos, mask)),
        lambda y, idx, pos, mask, w: combine(y, routing(idx, pos, mask, w)),
    )


def compiled_for(fn, mode, args):
    """compiled(fn, mode); TF's "graph_dynamic" / "jit_dynamic": a
    tf.function with every dimension unknown when traced, so that the shape
    function cannot check the output and the CPU kernel / XLA lowering must."""
    if not mode.endswith("_dynamic"):
        return compiled(fn, mode)
    import tensorflow as tf

    signature = [tf.TensorSpec([None] * len(a.shape), tf.as_dtype(a.dtype)) for a in args]
    return tf.function(fn, jit_compile=mode.startswith("jit"), input_signature=signature)


# Every mode of this backend, for the error tests.
ERROR_MODES = ("eager", "graph", "jit") + (
    ("graph_dynamic", "jit_dynamic") if BACKEND == "tensorflow" else ()
)


def argument_errors():
    """What a bad argument or attribute raises: InvalidArgumentError (TF
    kernels and XLA) or ValueError (TF shape functions when tracing; the JAX
    wrapper's checks), JaxRuntimeError (the JAX FFI handlers)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return (tf.errors.InvalidArgumentError, ValueError)
    import jax

    return (ValueError, jax.errors.JaxRuntimeError)


def raw_op(op, num_experts, capacity):
    """The op itself (no gradient), called with its inputs: dispatch(x, idx,
    pos, mask), combine(y, idx, pos, mask, w), combine_grad(grad, y, idx,
    pos, mask, w) -> grad of y."""
    attrs = dict(num_experts=num_experts, capacity=capacity)
    if BACKEND == "tensorflow":
        lib = custom_call.LIBRARY.tf_ops()
        return {
            "dispatch": lambda *a: lib.tf_moe_dispatch(*a, **attrs),
            "combine": lambda *a: lib.tf_moe_combine(*a, **attrs),
            "combine_grad": lambda *a: lib.tf_moe_combine_grad(*a, **attrs)[0],
        }[op]
    import jax

    def dispatch(x, *routing):
        g, _, d = x.shape
        out = jax.ShapeDtypeStruct((num_experts, g, capacity, d), x.dtype)
        return custom_call._ffi("tf_moe_dispatch", out, x, *routing, **attrs)

    def combine(y, idx, *rest):
        out = jax.ShapeDtypeStruct(idx.shape[:2] + y.shape[-1:], y.dtype)
        return custom_call._ffi("tf_moe_combine", out, y, idx, *rest, **attrs)

    return {
        "dispatch": dispatch,
        "combine": combine,
        "combine_grad": lambda *a: raw_combine_grad(*a, **attrs),
    }[op]


def raw_inputs(op, groups, group_size, k, d, num_experts, capacity):
    """Zero inputs of `op` for these sizes (numpy), no choice routed."""
    routing = (
        np.zeros((groups, group_size, k), np.int32),
        np.zeros((groups, group_size, k), np.int32),
        np.zeros((groups, group_size, k), bool),
    )
    weight = np.zeros((groups, group_size, k), np.float32)

    def tokens():
        return np.zeros((groups, group_size, d), np.float32)

    def experts():
        return np.zeros((num_experts, groups, capacity, d), np.float32)

    if op == "dispatch":
        return (tokens(),) + routing
    if op == "combine":
        return (experts(),) + routing + (weight,)
    return (tokens(), experts()) + routing + (weight,)


def raw_combine_grad(grad, y, idx, pos, mask, weight, num_experts, capacity):
    """The combine adjoint op itself (not through a forward combine)."""
    if BACKEND == "tensorflow":
        return custom_call.LIBRARY.tf_ops().tf_moe_combine_grad(
            grad, y, idx, pos, mask, weight, num_experts=num_experts, capacity=capacity
        )[0]
    import jax

    results = (jax.ShapeDtypeStruct(y.shape, y.dtype),
               jax.ShapeDtypeStruct(weight.shape, weight.dtype))
    return custom_call._ffi("tf_moe_combine_grad", results, grad, y, idx, pos, mask,
                            weight, num_experts=num_experts, capacity=capacity)[0]


def run_path(test, path, mode, dtype, arrays, num_experts, capacity, rng):
    """Outputs and gradients of both ops of `path` (dict of numpy float32)."""
    idx, pos, mask, weight = arrays
    groups, group_size, _ = mask.shape
    d = 8
    x = rng.normal(size=(groups, group_size, d)).astype(np.float32)
    y = rng.normal(size=(num_experts, groups, capacity, d)).astype(np.float32)
    cot_x = rng.normal(size=y.shape).astype(np.float32)
    cot_y = rng.normal(size=x.shape).astype(np.float32)
    dispatch, combine = path_functions(path, num_experts, capacity)
    idx, pos, mask_t, weight_t = (
        ops.convert_to_tensor(idx, "int32"),
        ops.convert_to_tensor(pos, "int32"),
        ops.convert_to_tensor(mask, "bool"),
        ops.convert_to_tensor(weight, "float32"),
    )

    def both(x, y, w):
        ex, (dx,) = value_and_grads(lambda x: dispatch(x, idx, pos, mask_t), [x], cot_x)
        out, (dy, dw) = value_and_grads(
            lambda y, w: combine(y, idx, pos, mask_t, w), [y, w], cot_y
        )
        return ex, dx, out, dy, dw

    results = compiled(both, mode)(
        ops.convert_to_tensor(x, dtype), ops.convert_to_tensor(y, dtype), weight_t
    )
    names = ("dispatch", "grad_x", "combine", "grad_y", "grad_weight")
    out = {name: to_numpy(value) for name, value in zip(names, results)}
    out["inputs"] = (to_numpy(ops.convert_to_tensor(x, dtype)), to_numpy(
        ops.convert_to_tensor(y, dtype)))
    return out


class CustomCallTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        keras.config.set_dtype_policy("float32")

    def test_library_is_built_and_chosen(self):
        self.assertTrue(custom_call.is_available())
        self.assertEqual(resolve_plan("custom_call").path, "custom_call")
        self.assertEqual(resolve_plan("auto").path, "custom_call")

    def test_missing_library_error_says_how_to_build(self):
        with self.assertRaisesRegex(RuntimeError, "bazel build //tf_moe/ops/cc"):
            custom_call.LIBRARY.require("libtf_moe_does_not_exist.so")

    def test_library_dir_env_var_is_searched_first(self):
        with tempfile.TemporaryDirectory() as tmp:
            fake = os.path.join(tmp, custom_call.FFI_LIBRARY)
            open(fake, "w").close()
            with mock.patch.dict(os.environ, {custom_call.LIBRARY_DIR_ENV: tmp}):
                self.assertEqual(custom_call.LIBRARY.dirs()[0], tmp)
                self.assertEqual(
                    library.find_library(custom_call.FFI_LIBRARY, custom_call.LIBRARY.dirs()),
                    fake,
                )

    @parameterized.named_parameters(("eager", "eager"), ("jit", "jit"))
    def test_matches_numpy_formulas(self, mode):
        rng = np.random.default_rng(0)
        num_experts, capacity = 4, 3
        arrays = random_routings(rng, 5, 7, 2, num_experts, capacity)
        idx, pos, mask, weight = arrays
        got = run_path(self, "custom_call", mode, "float32", arrays, num_experts, capacity, rng)
        x, y = got["inputs"]
        expected = reference_dispatch(x, idx, pos, mask, num_experts, capacity)
        np.testing.assert_array_equal(got["dispatch"], expected)
        np.testing.assert_allclose(
            got["combine"], reference_combine(y, idx, pos, mask, weight), rtol=1e-5, atol=1e-6
        )
        # Invariants: each routed choice owns one slot; empty slots are 0.
        slots = {(idx[g, s, j], g, pos[g, s, j]) for g, s, j in zip(*np.nonzero(mask))}
        self.assertLen(slots, int(mask.sum()))
        filled = np.zeros(expected.shape[:3], bool)
        for slot in slots:
            filled[slot] = True
        self.assertTrue((got["dispatch"][~filled] == 0).all())
        self.assertTrue((got["grad_y"][~filled] == 0).all())
        self.assertTrue((got["grad_weight"][~mask] == 0).all())

    @parameterized.product(mode=("eager", "graph", "jit"), dtype=DTYPES)
    def test_matches_einsum_values_and_gradients(self, mode, dtype):
        num_experts, capacity = 4, 6
        arrays = random_routings(np.random.default_rng(1), 5, 16, 2, num_experts, capacity)
        got = run_path(
            self, "custom_call", mode, dtype, arrays, num_experts, capacity,
            np.random.default_rng(2),
        )
        want = run_path(
            self, "einsum", mode, dtype, arrays, num_experts, capacity,
            np.random.default_rng(2),
        )
        mask = arrays[2]
        for name in ("dispatch", "grad_x", "combine", "grad_y"):
            assert_close(self, got[name], want[name], dtype, name)
        assert_close(self, got["grad_weight"] * mask, want["grad_weight"] * mask,
                     dtype, "grad_weight")

    @parameterized.named_parameters(
        # (name, E, k, C): one expert, capacity 1, k = E, many experts.
        ("one_expert", 1, 1, 3),
        ("capacity_1", 6, 2, 1),
        ("k_equals_e", 3, 3, 4),
        ("top1_tight", 8, 1, 2),
        ("top2_loose", 5, 2, 12),
        ("many_experts", 16, 4, 3),
    )
    def test_fuzz_against_einsum(self, num_experts, k, capacity):
        # 600 groups, each an independent random routing: 3600 in all.
        arrays = random_routings(
            np.random.default_rng(num_experts * 100 + capacity), 600, 10, k,
            num_experts, capacity,
        )
        self.assertGreater(arrays[2].sum(), 0)
        got = run_path(self, "custom_call", "jit", "float32", arrays, num_experts,
                       capacity, np.random.default_rng(3))
        want = run_path(self, "einsum", "jit", "float32", arrays, num_experts,
                        capacity, np.random.default_rng(3))
        mask = arrays[2]
        for name in ("dispatch", "grad_x", "combine", "grad_y"):
            assert_close(self, got[name], want[name], "float32", name)
        assert_close(self, got["grad_weight"] * mask, want["grad_weight"] * mask,
                     "float32", "grad_weight")
        self.assertTrue((got["grad_weight"][~mask] == 0).all())

    def test_router_with_tied_logits(self):
        # A zero gate kernel ties every logit: top-k breaks the ties, capacity
        # then drops most choices.
        router = TopKRouter(k=2, num_experts=4, kernel_initializer="zeros")
        x = keras.random.normal((3, 16, 8), seed=4)
        routing = router.route(x, capacity=5)
        for op in (0, 1):
            got = dispatch_lib.DISPATCHERS["custom_call"][op]
            want = dispatch_lib.DISPATCHERS["einsum"][op]
            inputs = x if op == 0 else keras.random.normal((4, 3, 5, 8), seed=5)
            assert_close(self, got(inputs, routing), to_numpy(want(inputs, routing)),
                         "float32", f"op {op}")

    @parameterized.product(
        mode=("eager", "graph", "jit"),
        op=("dispatch", "combine", "combine_grad"),
        bad=(("position", 3), ("position", -1), ("expert_index", 4), ("expert_index", -2)),
        d=(8, 0),
    )
    def test_out_of_range_index_raises(self, mode, op, bad, d):
        # d = 0: nothing is copied, and the outputs have no elements (XLA
        # drops such a call unless it is marked as having side effects); the
        # routing is checked all the same.
        num_experts, capacity = 4, 3
        idx, pos, mask, weight = random_routings(
            np.random.default_rng(5), 2, 6, 2, num_experts, capacity
        )
        field, value = bad
        g, s, j = [int(v[0]) for v in np.nonzero(mask)]
        (pos if field == "position" else idx)[g, s, j] = value
        dispatch, combine = path_functions("custom_call", num_experts, capacity)
        args = [ops.convert_to_tensor(a) for a in (idx, pos, mask)]
        w = ops.convert_to_tensor(weight)
        x = ops.ones((2, 6, d))
        y = ops.ones((num_experts, 2, capacity, d))
        if op == "dispatch":
            fn = lambda: dispatch(x, *args)  # noqa: E731
        elif op == "combine":
            fn = lambda: combine(y, *args, w)  # noqa: E731
        else:
            fn = lambda: raw_combine_grad(  # noqa: E731
                ops.ones((2, 6, d)), y, *args, w, num_experts, capacity
            )
        with self.assertRaisesRegex(Exception, f"{field}={value} outside") as caught:
            to_numpy(compiled(fn, mode)())
        self.assertRegex(type(caught.exception).__name__,
                         "InvalidArgumentError|JaxRuntimeError|XlaRuntimeError")

    @parameterized.product(
        op=("dispatch", "combine", "combine_grad"),
        mode=ERROR_MODES,
        bad=(
            ("capacity", 2**40), ("capacity", 2**62), ("capacity", 2**31), ("capacity", 0),
            ("num_experts", 2**40), ("num_experts", 2**62), ("num_experts", 2**31),
            ("num_experts", -1),
        ),
    )
    def test_bad_attribute_raises(self, op, mode, bad):
        """num_experts and capacity outside [1, 2**31 - 1] (expert_index and
        position are int32) are an error naming the attribute and its value,
        before anything is allocated (2**62: the [E, G, C, d] output would
        overflow int64; TF's TensorShape and XLA's Shape abort on that)."""
        attr, value = bad
        attrs = dict(num_experts=2, capacity=2)
        inputs = raw_inputs(op, 2, 3, 1, 4, **attrs)
        attrs[attr] = value
        fn = raw_op(op, **attrs)
        if value < 1 and BACKEND == "tensorflow":
            # TF's own check of the attribute's minimum ("int >= 1").
            pattern = (rf"(?i)attr '{attr}' (of|of '\w+' Op passed) {value} "
                       r"(must be at least|less than) minimum 1")
        else:
            pattern = (rf"`{attr}` must be in \[1, 2147483647\] \(`\w+` is int32\)\. "
                       rf"Received: {attr}={value}")
        with self.assertRaisesRegex(argument_errors(), pattern):
            to_numpy(compiled_for(fn, mode, inputs)(*inputs))

    @parameterized.product(op=("combine", "combine_grad"), mode=("eager", "jit"))
    def test_ffi_handler_checks_attributes(self, op, mode):
        """The XLA FFI handlers check the attributes themselves (a call that
        does not go through the Python wrapper's checks)."""
        inputs = raw_inputs(op, 2, 3, 1, 4, num_experts=2, capacity=2)
        attrs = dict(num_experts=2, capacity=2**40)
        if BACKEND == "tensorflow":
            # The TF CPU kernels (eager) and the XLA lowering's handler.
            fn = raw_op(op, **attrs)
            errors = argument_errors()
        else:
            import jax

            target = "tf_moe_" + op
            results = jax.ShapeDtypeStruct(inputs[0].shape, np.float32)
            if op == "combine":
                results = jax.ShapeDtypeStruct((2, 3, 4), np.float32)
            else:
                results = (jax.ShapeDtypeStruct(inputs[1].shape, np.float32),
                           jax.ShapeDtypeStruct(inputs[-1].shape, np.float32))
            custom_call.LIBRARY.register_jax()
            call = jax.ffi.ffi_call(target, results)
            fn = lambda *a: call(  # noqa: E731
                *a, **{name: np.int64(v) for name, v in attrs.items()})
            errors = jax.errors.JaxRuntimeError
        with self.assertRaisesRegex(
            errors, r"`capacity` must be in \[1, 2147483647\].*Received: capacity=1099511627776"
        ):
            out = compiled(fn, mode)(*inputs)
            to_numpy(out[0] if isinstance(out, (tuple, list)) else out)

    @parameterized.product(op=("dispatch", "combine"), mode=ERROR_MODES)
    def test_output_too_large_raises(self, op, mode):
        """Inputs of no elements whose other dimensions are huge: the output
        ([E, G, C, d] = [4, 2**30, 4, 2**30]; [G, S, d] = [1, 2**60, 8]) has
        more than 2**63 - 1 bytes, an error naming its dimensions."""
        if op == "dispatch":
            inputs = raw_inputs(op, 2**30, 0, 1, 2**30, 4, 4)
            tf_pattern = (r"`expert_inputs` \[num_experts, G, capacity, d\] must have "
                          r"dimensions >= 0 and fit in int64.*Received: num_experts=4, "
                          r"G=1073741824, capacity=4, d=1073741824")
            jax_pattern = r"tf_moe_dispatch must have .* fit in int64.*shape=\(4, 1073741824"
        else:
            inputs = (np.zeros((4, 1, 4, 8), np.float32),) + raw_inputs(
                op, 1, 2**60, 0, 0, 1, 1)[1:]
            tf_pattern = (r"`outputs` \[G, S, d\] must have dimensions >= 0 and fit in "
                          r"int64.*Received: G=1, S=1152921504606846976, d=8")
            jax_pattern = r"tf_moe_combine must have .* fit in int64.*shape=\(1, 1152921504606846976, 8\)"
        fn = raw_op(op, num_experts=4, capacity=4)
        with self.assertRaisesRegex(
            argument_errors(), tf_pattern if BACKEND == "tensorflow" else jax_pattern
        ):
            to_numpy(compiled_for(fn, mode, inputs)(*inputs))

    @parameterized.named_parameters(
        ("float32", "float32"), ("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16"),
        ("expert_choice", "float32", True),
    )
    def test_model_fit_matches_einsum(self, policy, expert_choice=False):
        data_x = np.random.default_rng(6).normal(size=(32, 8, 16)).astype(np.float32)
        data_y = np.random.default_rng(7).normal(size=(32, 8, 16)).astype(np.float32)
        histories, weights = {}, {}
        for path in ("custom_call", "einsum"):
            keras.utils.set_random_seed(8)
            moe = tf_moe.layers.MoE(
                num_experts=4, expert_hidden_dim=32, group_size=32, dispatch=path,
                router=(ExpertChoiceRouter(kernel_initializer="glorot_uniform")
                        if expert_choice
                        else TopKRouter(k=2, kernel_initializer="glorot_uniform")),
                capacity_factor=1.0, dtype=policy,
            )
            model = keras.Sequential([keras.Input((8, 16)), moe])
            model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=True)
            history = model.fit(data_x, data_y, batch_size=8, epochs=2, verbose=0,
                                shuffle=False)
            histories[path] = np.array(history.history["loss"])
            weights[path] = [to_numpy(w) for w in model.weights]
            self.assertEqual(moe.plan(training=True).path, path)
        dtype = {"float32": "float32", "mixed_bfloat16": "bfloat16",
                 "mixed_float16": "float16"}[policy]
        self.assertLess(histories["custom_call"][1], histories["custom_call"][0])
        assert_close(self, histories["custom_call"], histories["einsum"], dtype, "loss")
        for got, want in zip(weights["custom_call"], weights["einsum"]):
            assert_close(self, got, want, dtype, "weights")


if __name__ == "__main__":
    absltest.main()
