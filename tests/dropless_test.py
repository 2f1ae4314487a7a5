"""Tests for tf_moe.ops.dropless: the dropless layout, dispatch/combine,
grouped matmul, and the whole dropless MoE computation.

References, written here in numpy from the formulas in ops/dropless.py's
docstring and DESIGN.md's MoE output y = sum_j w_j * FFN_{e_j}(x):

    layout:   each routed choice gets its own row inside its expert's segment;
              segments are contiguous, in expert order, padded to `tile`.
    dispatch: rows[row[g, s, j]] = x[g, s]; 0 elsewhere.
    grouped:  out[r] = rows[r] @ kernel[expert(r)].
    combine:  y[g, s] = sum_j combine_weight[g, s, j] * out_rows[row[g, s, j]].

The full dropless computation must also equal the MoE layer's einsum path with
capacity C = S (nothing dropped), in value and gradient, eagerly and compiled.

The "custom_call" grouped matmul (C++ in tf_moe/ops/cc_dropless: TF op library
and typed XLA FFI handlers) is checked against the segment formula

    out[r] = rows[r] @ kernel[e] for r in expert e's segment [start_e,
             start_e + group_sizes[e]); 0 past sum(group_sizes);
    d rows[r] = grad[r] @ kernel[e]^T;  d kernel[e] = rows_e^T @ grad_e,

eagerly (TF: CPU kernels; JAX: op by op), in a TF graph (CPU kernels) and
compiled (TF jit_compile=True, jax.jit: the FFI handlers), in float32,
bfloat16 and float16, for empty experts, all rows in one expert, an unused
tail, and segments longer than a task or a 16-bit conversion chunk (so the
parallel path runs); bad group_sizes must raise, not crash (also where the
output has no elements, a call XLA would drop unless it is marked as having
side effects), and so must an output too large for int64 (TF's TensorShape
and XLA's Shape abort the process on one).

Shape letters: G groups, S tokens per group, d model dim, h hidden dim,
E experts, k choices per token, N buffer rows.
"""

import tempfile
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

import tf_moe
from tf_moe.ops import custom_call
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.ops import dropless
from tf_moe.ops import grouped_matmul as grouped_matmul_lib
from tf_moe.ops.custom_call import CustomCallUnavailableError
from tf_moe.routing import Routing

BACKEND = keras.backend.backend()
DTYPES = ("float32", "bfloat16", "float16")
# Tolerances of results rounded once to each dtype, against a float64
# reference on the same (dtype-rounded) operands.
TOLERANCE = {
    "float32": {"rtol": 1e-5, "atol": 1e-4},
    "bfloat16": {"rtol": 1e-2, "atol": 1e-2},
    "float16": {"rtol": 2e-3, "atol": 2e-3},
}


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def random_routing(rng, groups, group_size, k, num_experts, experts="random", request_rate=0.85):
    """A `Routing` (numpy-backed tensors) with distinct experts per token."""
    if experts == "one":
        index = np.zeros((groups, group_size, k), np.int32)
        index[..., 1:] = np.arange(1, k)  # still distinct per token
    else:
        pool = num_experts if experts == "random" else max(k, num_experts // 2)
        index = np.stack(
            [
                np.stack([rng.permutation(pool)[:k] for _ in range(group_size)])
                for _ in range(groups)
            ]
        ).astype(np.int32)
    mask = rng.random((groups, group_size, k)) < request_rate
    weight = np.where(mask, rng.random((groups, group_size, k)), 0.0).astype(np.float32)
    return Routing(
        expert_index=ops.convert_to_tensor(index),
        position=ops.convert_to_tensor(np.full_like(index, -7)),  # unused
        dispatch_mask=ops.convert_to_tensor(mask),
        combine_weight=ops.convert_to_tensor(weight),
        requested_mask=ops.convert_to_tensor(mask),
        token_mask=ops.convert_to_tensor(np.ones((groups, group_size), bool)),
        router_probs=ops.convert_to_tensor(np.zeros((groups, group_size, num_experts), np.float32)),
        aux_losses={},
        num_experts=num_experts,
        capacity=group_size,
    )


def round_to(x, dtype):
    """x (numpy) rounded to `dtype`, as float32."""
    return to_numpy(ops.cast(ops.cast(x, dtype), "float32"))


def value_and_grads(fn, args, cotangent, mode="eager"):
    """(fn(*args), gradients of sum(fn(*args) * cotangent) w.r.t. args), per
    backend: "eager" (TF: CPU kernels; JAX: op by op), "graph" (value and
    gradients in one tf.function without XLA; JAX: jax.jit) or "jit" (in one
    tf.function(jit_compile=True) / jax.jit)."""
    if BACKEND == "jax":
        import jax

        def loss(*a):
            value = fn(*a)
            return (value.astype("float32") * cotangent).sum(), value

        step = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
        if mode != "eager":
            step = jax.jit(step)
        (_, value), grads = step(*args)
        return to_numpy(value), [to_numpy(g) for g in grads]
    import tensorflow as tf

    def step(*a):
        with tf.GradientTape() as tape:
            for x in a:
                tape.watch(x)
            value = fn(*a)
            loss = tf.reduce_sum(tf.cast(value, tf.float32) * cotangent)
        return value, tape.gradient(loss, list(a))

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "jit")
    value, grads = step(*[tf.convert_to_tensor(a) for a in args])
    return to_numpy(value), [to_numpy(g) for g in grads]


def numpy_grouped_matmul(rows, kernel, expert, cotangent):
    """(out, d rows, d kernel) in float64: out[r] = rows[r] @ kernel[expert[r]]
    (0 where expert[r] = E) and its gradients for the cotangent."""
    num_experts = kernel.shape[0]
    out = np.zeros((rows.shape[0], kernel.shape[2]))
    d_rows = np.zeros(rows.shape)
    d_kernel = np.zeros(kernel.shape)
    for r in np.nonzero(expert < num_experts)[0]:
        k = kernel[expert[r]].astype(np.float64)
        out[r] = rows[r] @ k
        d_rows[r] = cotangent[r] @ k.T
        d_kernel[expert[r]] += np.outer(rows[r], cotangent[r])
    return out, d_rows, d_kernel


def layout_from_sizes(group_sizes, num_rows):
    """A tile-1 `DroplessLayout` with the given segment sizes (only the
    fields the grouped matmul reads)."""
    sizes = np.asarray(group_sizes, np.int32)
    used = np.repeat(np.arange(len(sizes)), sizes)  # expert of each used row
    expert = np.full(num_rows, len(sizes), np.int32)
    expert[: used.size] = used
    return dropless.DroplessLayout(
        row=None,
        group_sizes=ops.convert_to_tensor(sizes),
        tile_expert=ops.convert_to_tensor(expert),
        row_owner=None,
        num_rows=num_rows,
        tile=1,
    )


def compiled(fn):
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


ROUTING_CASES = (
    ("top2_tile1", 2, 5, 2, 6, "random", 1),
    ("top2_tile4", 2, 5, 2, 6, "random", 4),
    ("top1_tile3", 3, 7, 1, 4, "random", 3),
    ("one_expert_tile4", 2, 6, 2, 5, "one", 4),
    ("empty_experts_tile2", 2, 6, 2, 8, "half", 2),
    ("k_equals_e_tile2", 1, 5, 3, 3, "random", 2),
)


class LayoutTest(parameterized.TestCase):
    @parameterized.named_parameters(*ROUTING_CASES)
    def test_layout_invariants(self, groups, group_size, k, num_experts, experts, tile):
        rng = np.random.default_rng(0)
        for _ in range(5):
            routing = random_routing(rng, groups, group_size, k, num_experts, experts)
            layout = dropless.dropless_layout(routing, tile)
            index = to_numpy(routing.expert_index)
            mask = to_numpy(routing.dispatch_mask)
            row = to_numpy(layout.row)
            sizes = to_numpy(layout.group_sizes)
            n = layout.num_rows
            self.assertEqual(n % tile, 0)
            self.assertGreaterEqual(n, sizes.sum())
            counts = np.array([(mask & (index == e)).sum() for e in range(num_experts)])
            np.testing.assert_array_equal(sizes, -(-counts // tile) * tile)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            # Unrouted choices point past the buffer; routed ones are unique,
            # inside their expert's segment, packed from its start.
            np.testing.assert_array_equal(row[~mask], n)
            routed_rows = row[mask]
            self.assertLen(np.unique(routed_rows), routed_rows.size)
            for e in range(num_experts):
                mine = np.sort(row[mask & (index == e)])
                np.testing.assert_array_equal(mine, starts[e] + np.arange(counts[e]))
            # Tile experts cover the segments, then E for unused tiles.
            expected_tile_expert = np.full(n // tile, num_experts)
            for e in range(num_experts):
                expected_tile_expert[starts[e] // tile : (starts[e] + sizes[e]) // tile] = e
            np.testing.assert_array_equal(to_numpy(layout.tile_expert), expected_tile_expert)
            # Row owners invert `row`.
            owner = to_numpy(layout.row_owner)
            expected_owner = np.full(n, groups * group_size)
            g_idx, s_idx, _ = np.nonzero(mask)
            expected_owner[row[mask]] = g_idx * group_size + s_idx
            np.testing.assert_array_equal(owner, expected_owner)

    def test_rejects_bad_tile(self):
        routing = random_routing(np.random.default_rng(0), 1, 4, 1, 2)
        with self.assertRaisesRegex(ValueError, "tile"):
            dropless.dropless_layout(routing, 0)


class DispatchCombineTest(parameterized.TestCase):
    @parameterized.named_parameters(*ROUTING_CASES)
    def test_dispatch_combine_match_numpy(self, groups, group_size, k, num_experts, experts, tile):
        rng = np.random.default_rng(1)
        routing = random_routing(rng, groups, group_size, k, num_experts, experts)
        layout = dropless.dropless_layout(routing, tile)
        d = 3
        x = rng.normal(size=(groups, group_size, d)).astype(np.float32)
        out_rows = rng.normal(size=(layout.num_rows, d)).astype(np.float32)
        mask = to_numpy(routing.dispatch_mask)
        row = to_numpy(layout.row)
        weight = to_numpy(routing.combine_weight)
        expected_rows = np.zeros((layout.num_rows, d), np.float32)
        expected_y = np.zeros_like(x)
        for g, s, j in zip(*np.nonzero(mask)):
            expected_rows[row[g, s, j]] = x[g, s]
            expected_y[g, s] += weight[g, s, j] * out_rows[row[g, s, j]]
        np.testing.assert_allclose(to_numpy(dropless.dropless_dispatch(x, layout)), expected_rows)
        np.testing.assert_allclose(
            to_numpy(dropless.dropless_combine(out_rows, routing, layout)), expected_y, rtol=1e-5, atol=1e-6
        )


IMPLEMENTATIONS = ("reference", "ragged_dot", "custom_call")


def jax_only(implementation):
    """True if `implementation` runs on JAX only (TF must reject it)."""
    return implementation == "ragged_dot"


class GroupedMatmulTest(parameterized.TestCase):
    @parameterized.product(
        implementation=IMPLEMENTATIONS,
        tile=(1, 4),
        dtype=DTYPES,
        mode=("eager", "jit"),
    )
    def test_value_and_gradients_match_numpy(self, implementation, tile, dtype, mode):
        rng = np.random.default_rng(2)
        routing = random_routing(rng, 2, 6, 2, 5)
        layout = dropless.dropless_layout(routing, tile)
        a, b, e = 4, 3, 5
        # Round the operands (and the cotangent, which reaches the backward
        # pass in the dtype) so that the float64 reference sees them.
        rows = round_to(rng.normal(size=(layout.num_rows, a)), dtype)
        kernel = round_to(rng.normal(size=(e, a, b)), dtype)
        cot = round_to(rng.normal(size=(layout.num_rows, b)), dtype)

        def fn(r, w):
            return grouped_matmul_lib.grouped_matmul(
                ops.cast(r, dtype), ops.cast(w, dtype), layout, implementation
            )

        if BACKEND != "jax" and jax_only(implementation):
            with self.assertRaisesRegex(ValueError, "JAX"):
                fn(rows, kernel)
            return
        value, (d_rows, d_kernel) = value_and_grads(fn, (rows, kernel), cot, mode)
        expert = np.repeat(to_numpy(layout.tile_expert), tile)
        expected = numpy_grouped_matmul(rows, kernel, expert, cot)
        # The reference path may accumulate in the dtype (a = 4 terms).
        tol = TOLERANCE["float32"] if dtype == "float32" else {"rtol": 2e-2, "atol": 5e-2}
        for actual, want in zip((value, d_rows, d_kernel), expected):
            np.testing.assert_allclose(actual, want, **tol)
        unused = np.nonzero(expert >= e)[0]
        self.assertGreater(unused.size, 0)  # the buffer has an unused tail here
        np.testing.assert_array_equal(value[unused], 0.0)

    def test_rejects_unknown_implementation(self):
        routing = random_routing(np.random.default_rng(0), 1, 4, 1, 2)
        layout = dropless.dropless_layout(routing)
        with self.assertRaisesRegex(ValueError, "implementation"):
            grouped_matmul_lib.grouped_matmul(np.ones((layout.num_rows, 2), np.float32), np.ones((2, 2, 3), np.float32), layout, "cublas")


# (name, group_sizes, N, a, b): segment layouts for the custom call.
SEGMENT_CASES = (
    ("empty_experts_and_tail", (3, 0, 5, 0, 1), 12, 5, 4),
    ("all_rows_one_expert", (0, 0, 9, 0), 9, 3, 6),
    ("all_rows_unused", (0, 0, 0), 4, 3, 2),
    ("no_tail", (4, 4), 8, 2, 3),
    # Segments longer than a task (256 rows) and a 16-bit conversion chunk
    # (2^16 / max(a, b) = 218 rows), and enough work to run on threads.
    ("long_segments", (600, 0, 130), 760, 300, 200),
)


def raw_custom_call(transpose_kernel=False):
    """(grouped matmul, kernel grad) as the backend's raw ops (no gradient)."""
    if BACKEND == "jax":
        return (
            lambda r, k, s: grouped_matmul_lib._jax_ffi_grouped_matmul(r, k, s, transpose_kernel),
            grouped_matmul_lib._jax_ffi_kernel_grad,
        )
    lib = grouped_matmul_lib.LIBRARY.tf_ops()
    return (
        lambda r, k, s: lib.tf_moe_grouped_matmul(r, k, s, transpose_kernel=transpose_kernel),
        lib.tf_moe_grouped_matmul_kernel_grad,
    )


def runtime_error():
    """The exception type a failing custom call raises on this backend."""
    if BACKEND == "jax":
        import jax

        return jax.errors.JaxRuntimeError
    import tensorflow as tf

    return tf.errors.InvalidArgumentError


# Every mode of this backend, for the error tests; TF's "*_dynamic": traced
# with every dimension unknown, so that the shape function cannot check the
# output and the CPU kernel / XLA lowering must.
ERROR_MODES = ("eager", "graph", "jit") + (
    ("graph_dynamic", "jit_dynamic") if BACKEND == "tensorflow" else ()
)


def compiled_for(fn, mode, args):
    if mode == "eager":
        return fn
    if BACKEND == "jax":
        return compiled(fn)
    import tensorflow as tf

    signature = None
    if mode.endswith("_dynamic"):
        signature = [tf.TensorSpec([None] * len(a.shape), tf.as_dtype(a.dtype)) for a in args]
    return tf.function(fn, jit_compile=mode.startswith("jit"), input_signature=signature)


def argument_errors():
    """InvalidArgumentError (TF kernels, XLA) or ValueError (TF shape
    functions when tracing; the JAX wrapper's checks), JaxRuntimeError (the
    JAX FFI handlers)."""
    if BACKEND == "jax":
        import jax

        return (ValueError, jax.errors.JaxRuntimeError)
    import tensorflow as tf

    return (tf.errors.InvalidArgumentError, ValueError)


def numpy_grouped_matmul_bias(rows, kernel, bias, expert, activation, cotangent,
                              near_kink=None):
    """(out, d rows, d kernel, d bias) in float64 of out[r] = act(rows[r] @
    kernel[e] + bias[e]) for e = expert[r] < E (0 where expert[r] = E).

    near_kink: None, or (band, output): where |pre-activation| < band, relu's
    derivative follows `output` > 0 instead (an implementation that rounds
    before adding the bias may land on either side of 0 there)."""
    num_experts = kernel.shape[0]
    used = expert < num_experts
    safe = np.minimum(expert, num_experts - 1)
    pre = np.einsum("na,nab->nb", rows.astype(np.float64), kernel[safe].astype(np.float64))
    pre = pre + bias[safe]
    out = np.maximum(pre, 0.0) if activation == "relu" else pre
    out[~used] = 0.0
    positive = pre > 0
    if near_kink is not None:
        band, output = near_kink
        positive = np.where(np.abs(pre) < band, np.asarray(output, np.float64) > 0, positive)
    d_pre = cotangent * positive if activation == "relu" else cotangent.astype(np.float64)
    d_pre = np.where(used[:, None], d_pre, 0.0)
    d_rows = np.einsum("nb,nab->na", d_pre, kernel[safe].astype(np.float64))
    d_kernel = np.zeros(kernel.shape)
    d_bias = np.zeros(bias.shape)
    for r in np.nonzero(used)[0]:
        d_kernel[expert[r]] += np.outer(rows[r], d_pre[r])
        d_bias[expert[r]] += d_pre[r]
    return out, d_rows, d_kernel, d_bias


class GroupedMatmulBiasTest(parameterized.TestCase):
    """grouped_matmul_bias (the custom call fuses bias and relu; the other
    implementations compose them) against the numpy formula."""

    @parameterized.product(
        case=SEGMENT_CASES[:2] + SEGMENT_CASES[3:],
        activation=(None, "relu"),
        dtype=DTYPES,
        mode=("eager", "jit"),
    )
    def test_custom_call_matches_numpy(self, case, activation, dtype, mode):
        self.check_against_numpy(case, "custom_call", activation, dtype, mode)

    # The reference composes matmul, bias and relu in the dtype (16-bit
    # accumulation by XLA:CPU), so its 16-bit cases stay short; long segments
    # in float32 only.
    @parameterized.product(
        case=SEGMENT_CASES[:2] + SEGMENT_CASES[3:4],
        activation=(None, "relu"),
        dtype=DTYPES,
        mode=("eager", "jit"),
    )
    def test_reference_matches_numpy(self, case, activation, dtype, mode):
        self.check_against_numpy(case, "reference", activation, dtype, mode)

    @parameterized.product(activation=(None, "relu"), mode=("eager", "jit"))
    def test_reference_long_segments_float32(self, activation, mode):
        self.check_against_numpy(SEGMENT_CASES[4], "reference", activation, "float32", mode)

    def check_against_numpy(self, case, implementation, activation, dtype, mode):
        _, sizes, n, a, b = case
        layout = layout_from_sizes(sizes, n)
        rng = np.random.default_rng(11)
        e = len(sizes)
        rows = round_to(rng.normal(size=(n, a)), dtype)
        kernel = round_to(rng.normal(size=(e, a, b)), dtype)
        bias = round_to(rng.normal(size=(e, b)), dtype)
        cot = round_to(rng.normal(size=(n, b)), dtype)

        def fn(r, w, c):
            return grouped_matmul_lib.grouped_matmul_bias(
                ops.cast(r, dtype), ops.cast(w, dtype), ops.cast(c, dtype), layout,
                activation, implementation,
            )

        actual = value_and_grads(fn, (rows, kernel, bias), cot, mode)
        actual = [actual[0], *actual[1]]
        # A 16-bit composition (TF; the reference) rounds x @ W before adding
        # the bias: pre-activations within a few ulps of 0 may change sign.
        band = 0.0 if dtype == "float32" else 0.05 * np.sqrt(a)
        expected = numpy_grouped_matmul_bias(
            rows, kernel, bias, to_numpy(layout.tile_expert), activation, cot,
            near_kink=(band, actual[0]),
        )
        tol = TOLERANCE[dtype] if implementation == "custom_call" else (
            TOLERANCE["float32"] if dtype == "float32" else {"rtol": 2e-2, "atol": 5e-2})
        for name, got, want in zip(("out", "d_rows", "d_kernel", "d_bias"), actual, expected):
            np.testing.assert_allclose(got, want, err_msg=name, **tol)
        tail = slice(sum(sizes), n)
        np.testing.assert_array_equal(actual[0][tail], 0.0)  # not act(bias)
        np.testing.assert_array_equal(actual[1][tail], 0.0)
        if activation == "relu":
            self.assertTrue(np.any(actual[0][: sum(sizes)] == 0.0))  # relu cut something

    def test_rejects_bad_arguments(self):
        layout = layout_from_sizes((2, 1), 4)
        rows, kernel = np.ones((4, 3), np.float32), np.ones((2, 3, 5), np.float32)
        with self.assertRaisesRegex(ValueError, r"`activation` must be one of .*gelu"):
            grouped_matmul_lib.grouped_matmul_bias(rows, kernel, np.ones((2, 5), np.float32),
                                                   layout, "gelu")
        with self.assertRaisesRegex(ValueError, r"`bias` must be \[E, b\] = \[2, 5\].*\(5,\)"):
            grouped_matmul_lib.grouped_matmul_bias(rows, kernel, np.ones((5,), np.float32),
                                                   layout, "relu")


class CustomCallTest(parameterized.TestCase):
    """The C++ grouped matmul (TF op library, JAX FFI) on segment layouts."""

    @parameterized.product(case=SEGMENT_CASES, dtype=DTYPES, mode=("eager", "graph", "jit"))
    def test_segments_match_numpy(self, case, dtype, mode):
        _, sizes, n, a, b = case
        layout = layout_from_sizes(sizes, n)
        rng = np.random.default_rng(8)
        rows = round_to(rng.normal(size=(n, a)), dtype)
        kernel = round_to(rng.normal(size=(len(sizes), a, b)), dtype)
        cot = round_to(rng.normal(size=(n, b)), dtype)

        def fn(r, w):
            return grouped_matmul_lib.grouped_matmul(
                ops.cast(r, dtype), ops.cast(w, dtype), layout, "custom_call"
            )

        value, (d_rows, d_kernel) = value_and_grads(fn, (rows, kernel), cot, mode)
        expected = numpy_grouped_matmul(rows, kernel, to_numpy(layout.tile_expert), cot)
        for name, actual, want in zip(("out", "d_rows", "d_kernel"), (value, d_rows, d_kernel), expected):
            np.testing.assert_allclose(actual, want, err_msg=name, **TOLERANCE[dtype])
        # Rows past the segments, and their gradients, are exactly 0; so is
        # the kernel gradient of an empty expert.
        tail = slice(sum(sizes), n)
        np.testing.assert_array_equal(value[tail], 0.0)
        np.testing.assert_array_equal(d_rows[tail], 0.0)
        for e, size in enumerate(sizes):
            if size == 0:
                np.testing.assert_array_equal(d_kernel[e], 0.0)

    @parameterized.product(dtype=DTYPES, jit=(False, True))
    def test_transposed_kernel(self, dtype, jit):
        """transpose_kernel: kernel [E, b, a], out[r] = rows[r] @ kernel[e]^T."""
        sizes, n, a, b = (2, 0, 3), 6, 4, 5
        rng = np.random.default_rng(9)
        rows = round_to(rng.normal(size=(n, a)), dtype)
        kernel_t = round_to(rng.normal(size=(len(sizes), b, a)), dtype)
        matmul, _ = raw_custom_call(transpose_kernel=True)
        fn = compiled(matmul) if jit else matmul
        out = fn(ops.cast(rows, dtype), ops.cast(kernel_t, dtype), ops.convert_to_tensor(np.int32(sizes)))
        expert = to_numpy(layout_from_sizes(sizes, n).tile_expert)
        expected, _, _ = numpy_grouped_matmul(rows, kernel_t.transpose(0, 2, 1), expert, np.zeros((n, b)))
        np.testing.assert_allclose(to_numpy(ops.cast(out, "float32")), expected, **TOLERANCE[dtype])
        if BACKEND != "tensorflow":
            return
        # TF registers a gradient for the transposed op too.
        cot = round_to(rng.normal(size=(n, b)), dtype)
        _, (d_rows, d_kernel_t) = value_and_grads(
            lambda r, k: matmul(ops.cast(r, dtype), ops.cast(k, dtype), np.int32(sizes)),
            (rows, kernel_t), cot, "jit" if jit else "eager",
        )
        _, want_d_rows, want_d_kernel = numpy_grouped_matmul(rows, kernel_t.transpose(0, 2, 1), expert, cot)
        np.testing.assert_allclose(d_rows, want_d_rows, **TOLERANCE[dtype])
        np.testing.assert_allclose(d_kernel_t, want_d_kernel.transpose(0, 2, 1), **TOLERANCE[dtype])

    @parameterized.product(
        sizes=((-1, 3), (3, 2), (2, -1)),
        op=("grouped_matmul", "kernel_grad"),
        jit=(False, True),
    )
    def test_bad_group_sizes_raise(self, sizes, op, jit):
        """A negative size or sizes summing past N = 4 rows are an error from
        the op (TF CPU kernel, XLA FFI handler), not an out-of-bounds access."""
        rows = np.ones((4, 2), np.float32)
        other = np.ones((2, 2, 3), np.float32) if op == "grouped_matmul" else np.ones((4, 3), np.float32)
        fn = raw_custom_call()[0 if op == "grouped_matmul" else 1]
        fn = compiled(fn) if jit else fn
        with self.assertRaisesRegex(runtime_error(), "group_sizes"):
            to_numpy(fn(rows, other, ops.convert_to_tensor(np.int32(sizes))))
        # The same op with valid sizes still runs afterwards.
        out = to_numpy(fn(rows, other, ops.convert_to_tensor(np.int32((1, 3)))))
        self.assertEqual(out.shape, (4, 3) if op == "grouped_matmul" else (2, 2, 3))
        # All ones: each used row gives a = 2 per output; dK[e] = n_e per entry.
        self.assertEqual(out.sum(), 4 * 3 * 2 if op == "grouped_matmul" else (1 + 3) * 2 * 3)

    @parameterized.product(
        sizes=((-1, 3), (3, 2)),
        op=("grouped_matmul", "kernel_grad"),
        mode=("eager", "graph", "jit"),
    )
    def test_bad_group_sizes_raise_when_output_is_empty(self, sizes, op, mode):
        """Output [N, b = 0] / kernel_grad [E, a = 0, b]: nothing to compute,
        but the sizes are checked all the same."""
        if op == "grouped_matmul":
            inputs = (np.ones((4, 2), np.float32), np.ones((2, 2, 0), np.float32))
        else:
            inputs = (np.ones((4, 0), np.float32), np.ones((4, 3), np.float32))
        inputs += (np.int32(sizes),)
        fn = raw_custom_call()[0 if op == "grouped_matmul" else 1]
        with self.assertRaisesRegex(runtime_error(), "`group_sizes` must"):
            to_numpy(compiled_for(fn, mode, inputs)(*inputs))

    @parameterized.product(op=("grouped_matmul", "kernel_grad"), mode=ERROR_MODES)
    def test_output_too_large_raises(self, op, mode):
        """Inputs of no elements whose other dimensions are huge: the output
        (out [N, b] = [2**40, 2**40]; kernel_grad [E, a, b] = [3, 2**40,
        2**40]) cannot fit in int64, an error naming its dimensions."""
        big = 2**40
        if op == "grouped_matmul":
            inputs = (np.zeros((big, 0), np.float32), np.zeros((1, 0, big), np.float32),
                      np.zeros((1,), np.int32))
            tf_pattern = rf"`out` \[N, b\] must have .*fit in int64.*Received: N={big}, b={big}"
            jax_pattern = rf"tf_moe_grouped_matmul must have .*fit in int64.*shape=\({big}, {big}\)"
        else:
            inputs = (np.zeros((0, big), np.float32), np.zeros((0, big), np.float32),
                      np.zeros((3,), np.int32))
            tf_pattern = (rf"`kernel_grad` \[E, a, b\] must have .*fit in int64.*"
                          rf"Received: E=3, a={big}, b={big}")
            jax_pattern = (rf"tf_moe_grouped_matmul_kernel_grad must have .*fit in int64.*"
                           rf"shape=\(3, {big}, {big}\)")
        fn = raw_custom_call()[0 if op == "grouped_matmul" else 1]
        with self.assertRaisesRegex(
            argument_errors(), tf_pattern if BACKEND == "tensorflow" else jax_pattern
        ):
            to_numpy(compiled_for(fn, mode, inputs)(*inputs))

    @parameterized.parameters(2, -1)
    def test_ffi_handler_checks_transpose_kernel(self, value):
        """The FFI attribute transpose_kernel (int64) must be 0 or 1."""
        if BACKEND != "jax":
            self.skipTest("the TF op's transpose_kernel is a bool")
        import jax

        grouped_matmul_lib.LIBRARY.register_jax()
        call = jax.ffi.ffi_call("tf_moe_grouped_matmul", jax.ShapeDtypeStruct((4, 3), np.float32))
        with self.assertRaisesRegex(
            jax.errors.JaxRuntimeError,
            rf"`transpose_kernel` must be 0 or 1\. Received: transpose_kernel={value}",
        ):
            to_numpy(call(np.ones((4, 2), np.float32), np.ones((2, 2, 3), np.float32),
                          np.int32([1, 3]), transpose_kernel=np.int64(value)))

    def test_grouped_matmul_with_bad_layout_raises(self):
        layout = layout_from_sizes((2, 2), 4)._replace(group_sizes=ops.convert_to_tensor(np.int32([5, 0])))
        rows, kernel = np.ones((4, 2), np.float32), np.ones((2, 2, 3), np.float32)
        with self.assertRaisesRegex(runtime_error(), "group_sizes"):
            to_numpy(grouped_matmul_lib.grouped_matmul(rows, kernel, layout, "custom_call"))

    def test_auto_picks_custom_call(self):
        self.assertTrue(grouped_matmul_lib.is_available())
        self.assertEqual(grouped_matmul_lib.resolve_implementation("auto"), "custom_call")

    def test_missing_library_says_how_to_build(self):
        with tempfile.TemporaryDirectory() as empty:
            with mock.patch.object(grouped_matmul_lib.LIBRARY, "dirs", return_value=[empty]):
                with self.assertRaisesRegex(
                    CustomCallUnavailableError, r"bazel build //tf_moe/ops/cc_dropless:all"
                ):
                    grouped_matmul_lib.LIBRARY.require(grouped_matmul_lib.DROPLESS_TF_LIBRARY)

    def test_with_dispatch_custom_calls_in_one_program(self):
        """Both C++ libraries (dispatch/combine of tf_moe/ops/cc and the
        grouped matmul) loaded in one process, in one compiled function."""
        rng = np.random.default_rng(10)
        routing = random_routing(rng, 2, 4, 2, 3)
        # Valid positions (C = S = 4): earlier routed choices of the same
        # expert in the group.
        index, mask = to_numpy(routing.expert_index), to_numpy(routing.dispatch_mask)
        position = np.zeros_like(index)
        for g in range(2):
            seen = np.zeros(3, np.int32)
            for s_, j in np.ndindex(4, 2):
                if mask[g, s_, j]:
                    position[g, s_, j] = seen[index[g, s_, j]]
                    seen[index[g, s_, j]] += 1
        routing = routing._replace(position=ops.convert_to_tensor(position))
        x = rng.normal(size=(2, 4, 5)).astype(np.float32)
        kernel = rng.normal(size=(3, 5, 6)).astype(np.float32)
        layout = layout_from_sizes((3, 0, 4), 9)
        rows = rng.normal(size=(9, 5)).astype(np.float32)

        def both(x, rows, kernel):
            return (
                custom_call.custom_call_dispatch(x, routing),
                grouped_matmul_lib.grouped_matmul(rows, kernel, layout, "custom_call"),
            )

        expert_inputs, out = compiled(both)(x, rows, kernel)
        expected_inputs = to_numpy(dispatch_lib.DISPATCHERS["einsum"][0](x, routing))
        np.testing.assert_allclose(to_numpy(expert_inputs), expected_inputs, rtol=1e-6)
        expert = to_numpy(layout.tile_expert)
        expected_out, _, _ = numpy_grouped_matmul(rows, kernel, expert, np.zeros((9, 6)))
        np.testing.assert_allclose(to_numpy(out), expected_out, rtol=1e-5, atol=1e-5)


def build_moe(activation="relu", use_bias=True, num_experts=4, d=6, h=8, k=2, group_size=8):
    keras.utils.set_random_seed(3)
    moe = tf_moe.layers.MoE(
        num_experts=num_experts,
        expert_hidden_dim=h,
        expert_activation=activation,
        expert_use_bias=use_bias,
        router=tf_moe.routing.TopKRouter(k=k),
        capacity_factor=None,
        group_size=group_size,
        dispatch="einsum",
    )
    moe.build((2 * group_size, d))
    # Nonzero biases, so that a bias routed to the wrong expert shows.
    for variable in moe.experts.trainable_variables:
        if variable.path.endswith(("bi", "bo")):
            variable.assign(np.random.default_rng(4).normal(size=variable.shape).astype(np.float32))
    return moe


def numpy_moe(moe, groups, routing):
    """y[g, s] = sum_j w_j * FFN_{e_j}(x[g, s]), experts from their weights."""
    experts = moe.experts
    wi, wo = to_numpy(experts.wi), to_numpy(experts.wo)
    bi = to_numpy(experts.bi).reshape(wi.shape[0], -1) if experts.use_bias else None
    bo = to_numpy(experts.bo).reshape(wo.shape[0], -1) if experts.use_bias else None
    act = {"relu": lambda v: np.maximum(v, 0), "silu": lambda v: v / (1 + np.exp(-v))}
    index, mask = to_numpy(routing.expert_index), to_numpy(routing.dispatch_mask)
    weight = to_numpy(routing.combine_weight)
    y = np.zeros(groups.shape, np.float64)
    for g, s, j in zip(*np.nonzero(mask)):
        e = index[g, s, j]
        x = groups[g, s].astype(np.float64)
        if experts.gated:
            gate = x @ to_numpy(experts.wi_gate)[e]
            hidden = act["silu"](gate) * (x @ wi[e] + (bi[e] if bi is not None else 0))
        else:
            hidden = act[experts.activation](x @ wi[e] + (bi[e] if bi is not None else 0))
        y[g, s] += weight[g, s, j] * (hidden @ wo[e] + (bo[e] if bo is not None else 0))
    return y


def dropless_moe(groups, routing, experts, tile, implementation="auto"):
    """The dropless path with `tile`-row segments: layout, rows, the experts'
    FFNs on rows, combine (the pieces `DispatchPlan.run` puts together)."""
    layout = dropless.dropless_layout(routing, tile)
    rows = dropless.dispatch_rows(groups, routing, layout)
    out_rows = experts.on_rows(rows, layout, implementation=implementation)
    return dropless.combine_rows(out_rows, routing, layout)


class DroplessMoETest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("relu_tile1", "relu", True, 1),
        ("relu_tile4", "relu", True, 4),
        ("swiglu_nobias_tile2", "swiglu", False, 2),
    )
    def test_matches_numpy_formula(self, activation, use_bias, tile):
        moe = build_moe(activation, use_bias)
        rng = np.random.default_rng(5)
        groups = rng.normal(size=(2, 8, 6)).astype(np.float32)
        routing = moe.router.route(groups, capacity=8)
        y = dropless_moe(groups, routing, moe.experts, tile=tile)
        np.testing.assert_allclose(to_numpy(y), numpy_moe(moe, groups, routing), rtol=1e-4, atol=1e-5)

    @parameterized.product(jit=(False, True), implementation=IMPLEMENTATIONS)
    def test_matches_einsum_path_value_and_gradients(self, jit, implementation):
        """Same routing, experts and weights: dropless vs einsum dispatch with
        C = S (nothing dropped), gradients w.r.t. x and every expert weight."""
        moe = build_moe()
        rng = np.random.default_rng(6)
        groups = rng.normal(size=(2, 8, 6)).astype(np.float32)
        routing = moe.router.route(groups, capacity=8)

        def dropless_path(x):
            return dropless_moe(x, routing, moe.experts, tile=4, implementation=implementation)

        if keras.backend.backend() != "jax" and jax_only(implementation):
            with self.assertRaisesRegex(ValueError, "JAX"):
                dropless_path(groups)
            return

        def einsum_path(x):
            dispatch, combine = dispatch_lib.DISPATCHERS["einsum"]
            return combine(moe.experts(dispatch(x, routing)), routing)

        (v_a, g_a), (v_b, g_b) = (
            moe_value_and_grads(path, groups, moe.experts.trainable_variables, jit)
            for path in (dropless_path, einsum_path)
        )
        np.testing.assert_allclose(v_a, v_b, rtol=1e-5, atol=1e-5)
        self.assertLen(g_a, 1 + len(moe.experts.trainable_variables))
        for a, b in zip(g_a, g_b):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            self.assertGreater(np.abs(a).sum(), 0.0)


def moe_value_and_grads(compute, x, variables, jit):
    """(compute(x), gradients of sum(compute(x) * cotangent) w.r.t. x and
    `variables`), eager or compiled, per backend."""
    cot = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    if keras.backend.backend() == "jax":
        import jax

        def loss(x, weights):
            mapping = list(zip(variables, weights))
            with keras.StatelessScope(state_mapping=mapping):
                y = compute(x)
            return (y.astype("float32") * cot).sum(), y

        fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        if jit:
            fn = jax.jit(fn)
        (_, y), (d_x, d_w) = fn(x, [v.value for v in variables])
        return to_numpy(y), [to_numpy(d_x)] + [to_numpy(g) for g in d_w]
    import tensorflow as tf

    fn = tf.function(compute, jit_compile=True) if jit else compute
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * cot)
    grads = tape.gradient(loss, [x] + [v.value for v in variables])
    return to_numpy(y), [to_numpy(g) for g in grads]


if __name__ == "__main__":
    absltest.main()
