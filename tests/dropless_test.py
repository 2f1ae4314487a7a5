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

Shape letters: G groups, S tokens per group, d model dim, h hidden dim,
E experts, k choices per token, N buffer rows.
"""

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

import tf_moe
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.ops import dropless
from tf_moe.ops import grouped_matmul as grouped_matmul_lib
from tf_moe.routing import Routing


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


def grad_fn(fn, *args):
    """(value, gradients of sum(value * cotangent) w.r.t. args), per backend."""
    rng = np.random.default_rng(7)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value = fn(*args)
        cot = rng.normal(size=value.shape).astype(np.float32)
        grads = jax.grad(lambda *a: (fn(*a).astype("float32") * cot).sum(), argnums=tuple(range(len(args))))(*args)
        return to_numpy(value), cot, [to_numpy(g) for g in grads]
    import tensorflow as tf

    args = [tf.convert_to_tensor(a) for a in args]
    with tf.GradientTape() as tape:
        for a in args:
            tape.watch(a)
        value = fn(*args)
        cot = rng.normal(size=value.shape).astype(np.float32)
        loss = tf.reduce_sum(tf.cast(value, tf.float32) * cot)
    return to_numpy(value), cot, [to_numpy(g) for g in tape.gradient(loss, args)]


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
    return implementation in ("ragged_dot", "custom_call")


class GroupedMatmulTest(parameterized.TestCase):
    @parameterized.product(
        implementation=IMPLEMENTATIONS,
        tile=(1, 4),
        dtype=("float32", "bfloat16"),
    )
    def test_value_and_gradients_match_numpy(self, implementation, tile, dtype):
        rng = np.random.default_rng(2)
        routing = random_routing(rng, 2, 6, 2, 5)
        layout = dropless.dropless_layout(routing, tile)
        a, b, e = 4, 3, 5
        rows = rng.normal(size=(layout.num_rows, a)).astype(np.float32)
        kernel = rng.normal(size=(e, a, b)).astype(np.float32)
        # Round the inputs to the dtype, so that the float64 reference sees
        # the same operands.
        rows = to_numpy(ops.cast(ops.cast(rows, dtype), "float32"))
        kernel = to_numpy(ops.cast(ops.cast(kernel, dtype), "float32"))

        def fn(r, w):
            return grouped_matmul_lib.grouped_matmul(
                ops.cast(r, dtype), ops.cast(w, dtype), layout, implementation
            )

        if keras.backend.backend() != "jax" and jax_only(implementation):
            with self.assertRaisesRegex(ValueError, "JAX"):
                fn(rows, kernel)
            return
        value, cot, (d_rows, d_kernel) = grad_fn(fn, rows, kernel)
        expert = np.repeat(to_numpy(layout.tile_expert), tile)
        used = np.nonzero(expert < e)[0]
        expected = np.zeros((layout.num_rows, b))
        expected_d_rows = np.zeros(rows.shape)
        expected_d_kernel = np.zeros(kernel.shape)
        for r in used:
            expected[r] = rows[r] @ kernel[expert[r]]
            expected_d_rows[r] = cot[r] @ kernel[expert[r]].T
            expected_d_kernel[expert[r]] += np.outer(rows[r], cot[r])
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-2, "atol": 5e-2}
        np.testing.assert_allclose(to_numpy(ops.cast(value, "float32")), expected, **tol)
        np.testing.assert_allclose(to_numpy(ops.cast(d_rows, "float32")), expected_d_rows, **tol)
        np.testing.assert_allclose(to_numpy(ops.cast(d_kernel, "float32")), expected_d_kernel, **tol)
        unused = np.nonzero(expert >= e)[0]
        self.assertGreater(unused.size, 0)  # the buffer has an unused tail here
        np.testing.assert_array_equal(to_numpy(ops.cast(value, "float32"))[unused], 0.0)

    def test_custom_call_rejects_bad_tile_expert(self):
        """A tile expert outside [0, E] is an error from the handler, not an
        out-of-bounds read."""
        routing = random_routing(np.random.default_rng(0), 1, 4, 1, 2)
        layout = dropless.dropless_layout(routing, 2)
        bad = layout._replace(tile_expert=ops.convert_to_tensor(np.full(layout.num_rows // 2, 3, np.int32)))
        rows = np.ones((layout.num_rows, 2), np.float32)
        kernel = np.ones((2, 2, 3), np.float32)
        if keras.backend.backend() != "jax":
            with self.assertRaisesRegex(ValueError, "JAX"):
                grouped_matmul_lib.grouped_matmul(rows, kernel, bad, "custom_call")
            return
        import jax

        with self.assertRaisesRegex(jax.errors.JaxRuntimeError, "outside"):
            jax.block_until_ready(grouped_matmul_lib.grouped_matmul(rows, kernel, bad, "custom_call"))
        # The same call with a valid layout still works afterwards.
        out = to_numpy(grouped_matmul_lib.grouped_matmul(rows, kernel, layout, "custom_call"))
        self.assertEqual(out.shape, (layout.num_rows, 3))

    def test_rejects_unknown_implementation(self):
        routing = random_routing(np.random.default_rng(0), 1, 4, 1, 2)
        layout = dropless.dropless_layout(routing)
        with self.assertRaisesRegex(ValueError, "implementation"):
            grouped_matmul_lib.grouped_matmul(np.ones((layout.num_rows, 2), np.float32), np.ones((2, 2, 3), np.float32), layout, "cublas")


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
        y = dropless.dropless_moe(groups, routing, moe.experts, tile=tile)
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
            return dropless.dropless_moe(x, routing, moe.experts, tile=4, implementation=implementation)

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
