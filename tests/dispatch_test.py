"""Tests for tf_moe.ops.dispatch: the einsum and gather dispatch/combine paths.

References, written here from the formulas in ops/dispatch.py's docstring:

    dispatch: expert_inputs[e, g, c] = x[g, s] for the routed choice (g, s, j)
              with expert_index = e and position = c; 0 for empty slots.
    combine:  y[g, s] = sum_j combine_weight[g, s, j] *
              expert_outputs[expert_index[g, s, j], g, position[g, s, j]]
              (only routed choices contribute; combine_weight is 0 elsewhere).

Both paths must equal a plain numpy loop over choices and each other, in
value and in gradient (w.r.t. x, the expert outputs and combine_weight), on
hand-built `Routing` values (drops at capacity, ties, one expert for all,
empty experts, capacity 1, k = E, garbage positions where not routed) and on
real routers' output, eagerly and compiled (tf.function(jit_compile=True) /
jax.jit), with the routing passed into the compiled function and with the
router running inside it.

Shape letters: G groups, S tokens per group, d model dim, E experts,
C capacity, k choices per token.
"""

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.routing import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    Routing,
    TopKRouter,
    expert_choice_routing,
)

PATHS = ("einsum", "gather")


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def as_float32(x):
    return to_numpy(ops.cast(x, "float32")).astype(np.float32)


# ----------------------------------------------------------------------------
# Random routings that respect the `Routing` contract.


def random_routing(
    rng,
    groups,
    group_size,
    k,
    num_experts,
    capacity,
    experts="random",
    request_rate=0.85,
    padding=0,
    shuffle_positions=False,
    tie_weights=False,
):
    """Numpy arrays of a `Routing` consistent with `capacity`.

    Args:
        experts: "random" (k distinct experts per token), "one" (every token's
            first choice is expert 0), "subset" (only experts 0 and 1 are ever
            used, the others stay empty; k <= 2), or "identity" (k = E, choice
            j is expert j, as in expert-choice routing).
        request_rate: probability that a choice of a real token is requested.
        padding: number of padding tokens at the end of every group.
        shuffle_positions: fill each expert's buffer in a random order instead
            of rank-major token order.
        tie_weights: all routed choices get the same combine weight.

    Returns:
        dict of numpy arrays with the `Routing` field names, plus
        num_experts and capacity. Positions of choices that are not routed are
        garbage in [-1, C + 2] (the contract says they are meaningless).
    """
    shape = (groups, group_size, k)
    if experts == "identity":
        if k != num_experts:
            raise ValueError("identity experts need k == num_experts")
        expert_index = np.broadcast_to(np.arange(k), shape).copy()
    elif experts == "subset":
        if k > 2:
            raise ValueError("subset experts need k <= 2")
        expert_index = np.stack(
            [rng.permutation(2)[:k] for _ in range(groups * group_size)]
        ).reshape(shape)
    else:
        expert_index = np.stack(
            [rng.permutation(num_experts)[:k] for _ in range(groups * group_size)]
        ).reshape(shape)
        if experts == "one":
            # Put expert 0 first for every token, keeping choices distinct.
            zero_at = np.argmax(expert_index == 0, axis=-1)  # [G, S]
            has_zero = np.any(expert_index == 0, axis=-1)
            first = expert_index[..., 0].copy()
            g, s = np.nonzero(has_zero)
            expert_index[g, s, zero_at[g, s]] = first[g, s]
            expert_index[..., 0] = 0
    expert_index = expert_index.astype(np.int32)
    token_mask = np.ones((groups, group_size), bool)
    if padding:
        token_mask[:, group_size - padding :] = False
    requested = (rng.random(shape) < request_rate) & token_mask[..., None]
    if experts == "one":
        requested[..., 0] = token_mask
    position = rng.integers(-1, capacity + 3, size=shape).astype(np.int32)
    for g in range(groups):
        for e in range(num_experts):
            # Choices for expert e, rank-major then token order.
            choices = [
                (s, j)
                for j in range(k)
                for s in range(group_size)
                if requested[g, s, j] and expert_index[g, s, j] == e
            ]
            if shuffle_positions:
                choices = [choices[i] for i in rng.permutation(len(choices))]
            for slot, (s, j) in enumerate(choices):
                position[g, s, j] = slot
    dispatch_mask = requested & (position >= 0) & (position < capacity)
    if tie_weights:
        weight = np.full(shape, 0.5, np.float32)
    else:
        weight = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
    return dict(
        expert_index=expert_index,
        position=position,
        dispatch_mask=dispatch_mask,
        combine_weight=np.where(dispatch_mask, weight, 0.0).astype(np.float32),
        requested_mask=requested,
        token_mask=token_mask,
        num_experts=num_experts,
        capacity=capacity,
    )


def routing_from_router(router, x, capacity, token_mask=None, training=True):
    """Numpy arrays of a real router's `Routing`."""
    routing = router.route(
        ops.convert_to_tensor(x), capacity, token_mask=token_mask, training=training
    )
    arrays = {
        name: to_numpy(getattr(routing, name))
        for name in (
            "expert_index",
            "position",
            "dispatch_mask",
            "combine_weight",
            "requested_mask",
            "token_mask",
        )
    }
    arrays["num_experts"] = routing.num_experts
    arrays["capacity"] = routing.capacity
    return arrays


def make_routing(r, combine_weight=None):
    """A `Routing` of backend tensors from `random_routing`-style arrays."""
    groups, group_size, _ = r["expert_index"].shape
    if combine_weight is None:
        combine_weight = ops.convert_to_tensor(r["combine_weight"])
    return Routing(
        expert_index=ops.convert_to_tensor(r["expert_index"]),
        position=ops.convert_to_tensor(r["position"]),
        dispatch_mask=ops.convert_to_tensor(r["dispatch_mask"]),
        combine_weight=combine_weight,
        requested_mask=ops.convert_to_tensor(r["requested_mask"]),
        token_mask=ops.convert_to_tensor(r["token_mask"]),
        router_probs=ops.zeros((groups, group_size, r["num_experts"])),
        aux_losses={},
        num_experts=r["num_experts"],
        capacity=r["capacity"],
    )


def routed_choices(r):
    """(g, s, j, e, c) of every routed choice."""
    for g, s, j in zip(*np.nonzero(r["dispatch_mask"])):
        yield g, s, j, int(r["expert_index"][g, s, j]), int(r["position"][g, s, j])


# ----------------------------------------------------------------------------
# Numpy references: plain loops over choices.


def np_dispatch(x, r):
    groups, _, d = x.shape
    out = np.zeros((r["num_experts"], groups, r["capacity"], d), np.float64)
    filled = np.zeros(out.shape[:3], bool)
    for g, s, _, e, c in routed_choices(r):
        if not 0 <= c < r["capacity"] or filled[e, g, c]:
            raise ValueError(f"two routed choices share slot {(e, g, c)}")
        filled[e, g, c] = True
        out[e, g, c] = x[g, s]
    return out


def np_dispatch_grad(cotangent, r, x_shape):
    """d<dispatch(x), cotangent>/dx."""
    dx = np.zeros(x_shape, np.float64)
    for g, s, _, e, c in routed_choices(r):
        dx[g, s] += cotangent[e, g, c]
    return dx


def np_combine(expert_outputs, r, weight=None):
    weight = r["combine_weight"] if weight is None else weight
    _, groups, _, d = expert_outputs.shape
    group_size = r["expert_index"].shape[1]
    y = np.zeros((groups, group_size, d), np.float64)
    for g, s, j, e, c in routed_choices(r):
        y[g, s] += weight[g, s, j] * expert_outputs[e, g, c]
    return y


def np_combine_grads(expert_outputs, cotangent, r, weight=None):
    """d<combine(eo, w), cotangent>/d(eo, w); 0 for choices not routed."""
    weight = r["combine_weight"] if weight is None else weight
    d_outputs = np.zeros(expert_outputs.shape, np.float64)
    d_weight = np.zeros(r["expert_index"].shape, np.float64)
    for g, s, j, e, c in routed_choices(r):
        d_outputs[e, g, c] += weight[g, s, j] * cotangent[g, s]
        d_weight[g, s, j] = np.dot(expert_outputs[e, g, c], cotangent[g, s])
    return d_outputs, d_weight


def np_slot_owner(r, groups, group_size):
    """[G, E * C] token s in its group of each slot e * C + c; S if empty."""
    num_experts, capacity = r["num_experts"], r["capacity"]
    owner = np.full((groups, num_experts * capacity), group_size)
    for g, s, _, e, c in routed_choices(r):
        owner[g, e * capacity + c] = s
    return owner


# ----------------------------------------------------------------------------
# Backend helpers: value and vector-Jacobian product, eager or compiled.


def value_and_vjp(fn, primals, operands, cotangent, compiled=False):
    """(fn(primals, operands), d<fn(primals, operands), cotangent>/d primals)
    as numpy. `operands` (the routing tensors) are arguments too, so that the
    compiled function sees them as runtime values, as in a model, not as
    constants."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def step(primals, operands):
            with tf.GradientTape() as tape:
                tape.watch(primals)
                out = fn(primals, operands)
            return out, tape.gradient(out, primals, output_gradients=cotangent)

        if compiled:
            step = tf.function(step, jit_compile=True)
        convert = tf.convert_to_tensor
    elif keras.backend.backend() == "jax":
        import jax

        def step(primals, operands):
            out, vjp = jax.vjp(lambda p: fn(p, operands), primals)
            return out, vjp(ops.cast(cotangent, out.dtype))[0]

        if compiled:
            step = jax.jit(step)
        convert = ops.convert_to_tensor
    else:
        raise NotImplementedError(keras.backend.backend())
    out, grads = step([convert(p) for p in primals], [convert(o) for o in operands])
    return as_float32(out), [as_float32(g) for g in grads]


ROUTING_OPERANDS = ("expert_index", "position", "dispatch_mask")


def routing_operands(r):
    return [r[name] for name in ROUTING_OPERANDS]


def routing_of(r, operands, combine_weight=None):
    """A `Routing` whose index tensors are `operands`."""
    return Routing(
        *operands,
        combine_weight=combine_weight,
        requested_mask=None,
        token_mask=None,
        router_probs=None,
        aux_losses={},
        num_experts=r["num_experts"],
        capacity=r["capacity"],
    )


def dispatch_fn(path, r):
    dispatch = dispatch_lib.DISPATCHERS[path][0]
    return lambda primals, operands: dispatch(primals[0], routing_of(r, operands))


def combine_fn(path, r):
    combine = dispatch_lib.DISPATCHERS[path][1]
    return lambda primals, operands: combine(
        primals[0], routing_of(r, operands, combine_weight=primals[1])
    )


ROUTING_CASES = (
    dict(testcase_name="random", k=2, capacity=3),
    dict(testcase_name="drops_all_to_one_expert", k=1, capacity=3, experts="one"),
    dict(testcase_name="ties", k=2, capacity=3, tie_weights=True),
    dict(testcase_name="empty_experts", k=2, capacity=4, experts="subset"),
    dict(testcase_name="capacity_1", k=2, capacity=1),
    dict(
        testcase_name="k_equals_e",
        k=4,
        capacity=3,
        experts="identity",
        shuffle_positions=True,
    ),
    dict(testcase_name="no_drops", k=2, capacity=8, request_rate=1.0),
    dict(testcase_name="padding", k=2, capacity=2, padding=3),
    dict(testcase_name="shuffled_positions", k=3, capacity=4, shuffle_positions=True),
)
BFLOAT16_CASES = ("random", "drops_all_to_one_expert", "k_equals_e", "padding")
GROUPS, GROUP_SIZE, NUM_EXPERTS, DIM = 2, 8, 4, 8


def routing_case(seed, k, capacity, **kwargs):
    rng = np.random.default_rng(seed)
    r = random_routing(rng, GROUPS, GROUP_SIZE, k, NUM_EXPERTS, capacity, **kwargs)
    return rng, r


class DispatchTest(parameterized.TestCase):
    def check_paths(self, rng, r, dtype, compiled=False):
        """Both paths vs the numpy loops, in value and gradient."""
        groups, group_size, _ = r["expert_index"].shape
        e, c = r["num_experts"], r["capacity"]
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(
            rtol=2e-2, atol=2e-2
        )
        x = ops.cast(rng.normal(size=(groups, group_size, DIM)), dtype)
        eo = ops.cast(rng.normal(size=(e, groups, c, DIM)), dtype)
        w = r["combine_weight"]
        dispatch_cot = ops.cast(rng.normal(size=(e, groups, c, DIM)), dtype)
        combine_cot = ops.cast(rng.normal(size=(groups, group_size, DIM)), dtype)
        x64, eo64 = as_float32(x), as_float32(eo)
        # bfloat16 rounds the weights inside combine; use the rounded ones.
        w_ref = as_float32(ops.cast(w, dtype))
        want_dispatch = np_dispatch(x64, r)
        want_dx = np_dispatch_grad(as_float32(dispatch_cot), r, x64.shape)
        want_combine = np_combine(eo64, r, w_ref)
        want_deo, want_dw = np_combine_grads(eo64, as_float32(combine_cot), r, w_ref)
        routed = r["dispatch_mask"]
        results = {}
        for path in PATHS:
            got, (dx,) = value_and_vjp(
                dispatch_fn(path, r), [x], routing_operands(r), dispatch_cot, compiled
            )
            self.assertEqual(got.shape, (e, groups, c, DIM))
            np.testing.assert_allclose(got, want_dispatch, err_msg=path, **tol)
            np.testing.assert_allclose(dx, want_dx, err_msg=path, **tol)
            y, (deo, dw) = value_and_vjp(
                combine_fn(path, r), [eo, w], routing_operands(r), combine_cot,
                compiled,
            )
            np.testing.assert_allclose(y, want_combine, err_msg=path, **tol)
            np.testing.assert_allclose(deo, want_deo, err_msg=path, **tol)
            # Gradient w.r.t. the weights of routed choices; the unrouted ones
            # are checked in test_combine_weight_grad_zero_where_not_routed.
            np.testing.assert_allclose(
                np.where(routed, dw, 0), want_dw, err_msg=path, **tol
            )
            results[path] = (got, dx, y, deo, np.where(routed, dw, 0))
        # The two paths agree with each other (tighter than via the reference).
        for a, b in zip(results["einsum"], results["gather"]):
            np.testing.assert_allclose(a, b, **tol)

    @parameterized.named_parameters(*ROUTING_CASES)
    def test_float32_matches_reference(self, **case):
        rng, r = routing_case(0, **case)
        self.check_paths(rng, r, "float32")

    @parameterized.named_parameters(
        *[c for c in ROUTING_CASES if c["testcase_name"] in BFLOAT16_CASES]
    )
    def test_bfloat16_matches_reference(self, **case):
        rng, r = routing_case(1, **case)
        self.check_paths(rng, r, "bfloat16")

    @parameterized.named_parameters(
        dict(testcase_name="drops", k=1, capacity=3, experts="one"),
        dict(testcase_name="k_equals_e", k=4, capacity=3, experts="identity"),
        dict(testcase_name="padding", k=2, capacity=2, padding=3),
    )
    def test_compiled_matches_reference(self, **case):
        rng, r = routing_case(2, **case)
        self.check_paths(rng, r, "float32", compiled=True)
        if case.get("experts") == "one":
            self.check_paths(rng, r, "bfloat16", compiled=True)

    @parameterized.named_parameters(
        ("top2", lambda: TopKRouter(k=2, num_experts=4, seed=1), 3, True),
        ("switch_bpr", lambda: TopKRouter(
            k=1, num_experts=4, batch_prioritized_routing=True, seed=1), 2, True),
        ("noisy_top2", lambda: NoisyTopKRouter(k=2, num_experts=4, seed=1), 3, True),
        ("expert_choice", lambda: ExpertChoiceRouter(num_experts=4, seed=1), 3, False),
        ("top4_eval", lambda: TopKRouter(k=4, num_experts=4, seed=1), 5, False),
    )
    def test_real_router_output(self, make_router, capacity, training):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(GROUPS, GROUP_SIZE, DIM)).astype(np.float32)
        token_mask = np.ones((GROUPS, GROUP_SIZE), bool)
        token_mask[1, -3:] = False
        r = routing_from_router(
            make_router(), x, capacity, ops.convert_to_tensor(token_mask), training
        )
        self.assertTrue(np.all(r["combine_weight"][~r["dispatch_mask"]] == 0))
        self.assertFalse(np.any(r["dispatch_mask"][~token_mask]))
        self.check_paths(rng, r, "float32")
        self.check_slots(rng, r)

    @parameterized.named_parameters(("einsum", "einsum"), ("gather", "gather"))
    def test_router_inside_compiled_function(self, path):
        # As in a model: the router runs inside the compiled function, so the
        # routing tensors are computed in the graph. Compiled == eager, in
        # value and in gradient w.r.t. x (through dispatch and the router's
        # combine weights) and the expert outputs.
        router = TopKRouter(k=2, num_experts=NUM_EXPERTS, seed=1)
        rng = np.random.default_rng(6)
        x = rng.normal(size=(GROUPS, GROUP_SIZE, DIM)).astype(np.float32)
        eo = rng.normal(size=(NUM_EXPERTS, GROUPS, 3, DIM)).astype(np.float32)
        router.build(x.shape)
        dispatch, combine = dispatch_lib.DISPATCHERS[path]

        def fn(primals, operands):
            x, eo = primals
            routing = router.route(x, 3, training=False)
            return ops.concatenate(
                [
                    ops.reshape(dispatch(x, routing), (-1,)),
                    ops.reshape(combine(eo, routing), (-1,)),
                ]
            )

        size = NUM_EXPERTS * GROUPS * 3 * DIM + GROUPS * GROUP_SIZE * DIM
        cot = ops.convert_to_tensor(rng.normal(size=(size,)).astype(np.float32))
        want, want_grads = value_and_vjp(fn, [x, eo], [], cot)
        got, grads = value_and_vjp(fn, [x, eo], [], cot, compiled=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        self.assertGreater(np.abs(want_grads[0]).max(), 0.0)

    def check_slots(self, rng, r):
        """slot_owner/slot_mask vs numpy; each routed choice owns one slot;
        empty slots are zero in the dispatched buffer of both paths."""
        groups, group_size, _ = r["expert_index"].shape
        e, c = r["num_experts"], r["capacity"]
        routing = make_routing(r)
        owner = to_numpy(dispatch_lib.slot_owner(routing))
        mask = to_numpy(dispatch_lib.slot_mask(routing))
        np.testing.assert_array_equal(owner, np_slot_owner(r, groups, group_size))
        self.assertEqual(mask.shape, (e, groups, c))
        # Every routed choice owns a distinct slot within capacity.
        slots = [(g, ex, cx) for g, _, _, ex, cx in routed_choices(r)]
        self.assertLen(set(slots), len(slots))
        self.assertTrue(all(0 <= cx < c for _, _, cx in slots))
        self.assertEqual(int(mask.sum()), len(slots))
        for g, s, _, ex, cx in routed_choices(r):
            self.assertTrue(mask[ex, g, cx])
            self.assertEqual(owner[g, ex * c + cx], s)
        # Each expert holds at most C choices per group.
        for g in range(groups):
            for ex in range(e):
                count = np.sum(r["dispatch_mask"][g] & (r["expert_index"][g] == ex))
                self.assertLessEqual(count, c)
        # Empty slots are exactly zero in the dispatched buffer.
        x = ops.convert_to_tensor(
            rng.normal(size=(groups, group_size, DIM)).astype(np.float32) + 3.0
        )
        for path in PATHS:
            buffer = to_numpy(dispatch_lib.DISPATCHERS[path][0](x, routing))
            self.assertTrue(np.all(buffer[~mask] == 0), path)
            self.assertTrue(np.all(buffer[mask] != 0), path)

    @parameterized.named_parameters(*ROUTING_CASES)
    def test_slot_invariants(self, **case):
        rng, r = routing_case(4, **case)
        self.check_slots(rng, r)

    def test_drops_are_exactly_capacity_overflow(self):
        # All 8 tokens choose expert 0 with capacity 3: tokens 0..2 are kept in
        # order, 3..7 dropped; combine gives them exactly 0.
        rng, r = routing_case(5, k=1, capacity=3, experts="one", request_rate=1.0)
        kept = r["dispatch_mask"][..., 0]
        np.testing.assert_array_equal(
            kept, np.broadcast_to(np.arange(GROUP_SIZE) < 3, kept.shape)
        )
        eo = ops.convert_to_tensor(
            rng.normal(size=(NUM_EXPERTS, GROUPS, 3, DIM)).astype(np.float32)
        )
        for path in PATHS:
            y = to_numpy(dispatch_lib.DISPATCHERS[path][1](eo, make_routing(r)))
            self.assertTrue(np.all(y[:, 3:] == 0), path)
            self.assertTrue(np.all(y[:, :3] != 0), path)

    @parameterized.named_parameters(("einsum", "einsum"), ("gather", "gather"))
    def test_combine_weight_grad_zero_where_not_routed(self, path):
        # A choice that is not routed contributes nothing to y whatever its
        # weight (gather reads the zero row for it), so d y / d weight must be
        # 0 there. Position 0 of expert 0 is owned by token 0, so a path that
        # reads slot 0 for the unrouted token 1 leaks token 0's output.
        r = dict(
            expert_index=np.array([[[0], [0]]], np.int32),
            position=np.array([[[0], [1]]], np.int32),
            dispatch_mask=np.array([[[True], [False]]]),
            combine_weight=np.array([[[0.7], [0.0]]], np.float32),
            requested_mask=np.array([[[True], [True]]]),
            token_mask=np.ones((1, 2), bool),
            num_experts=2,
            capacity=1,
        )
        eo = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 1, 1, 3)
        cot = np.ones((1, 2, 3), np.float32)
        y, (_, dw) = value_and_vjp(
            combine_fn(path, r), [eo, r["combine_weight"]], routing_operands(r), cot
        )
        np.testing.assert_allclose(y[0, 1], 0.0)
        np.testing.assert_allclose(dw[0, :, 0], [6.0, 0.0])


def expert_choice_fn(path, capacity, token_mask, slot_major=True):
    """fn([x, expert_outputs, logits]) -> [dispatch(x), combine(eo)] flat, with
    the expert-choice routing of softmax(logits) computed inside (so that
    gradients reach the logits through the combine weights). slot_major=False
    drops the slot-major view: the token-major (k = E) form of before."""
    dispatch, combine = dispatch_lib.DISPATCHERS[path]

    def fn(primals, operands):
        x, eo, logits = primals
        routing = expert_choice_routing(ops.softmax(logits, axis=-1), capacity, token_mask)
        if not slot_major:
            routing = routing._replace(slot_token=None, slot_weight=None)
        return ops.concatenate(
            [ops.reshape(dispatch(x, routing), (-1,)), ops.reshape(combine(eo, routing), (-1,))]
        )

    return fn


class SlotMajorTest(parameterized.TestCase):
    """Expert choice's slot-major routing (O(E * C * d) per group) computes
    what the token-major einsum path computed: same dispatched buffers and
    outputs, same gradients w.r.t. x, the expert outputs and the router
    logits."""

    @parameterized.product(path=PATHS, compiled=(False, True), capacity=(1, 3, 8))
    def test_matches_token_major_einsum(self, path, compiled, capacity):
        rng = np.random.default_rng(capacity)
        groups, group_size, e = 3, 8, 4
        x = rng.normal(size=(groups, group_size, DIM)).astype(np.float32)
        eo = rng.normal(size=(e, groups, capacity, DIM)).astype(np.float32)
        logits = rng.normal(scale=2.0, size=(groups, group_size, e)).astype(np.float32)
        mask = np.ones((groups, group_size), bool)
        mask[2, 5:] = False  # padding: fewer real tokens than C = 8 in group 2
        mask = ops.convert_to_tensor(mask)
        size = e * groups * capacity * DIM + groups * group_size * DIM
        cot = ops.convert_to_tensor(rng.normal(size=(size,)).astype(np.float32))
        primals = [x, eo, logits]
        want, want_grads = value_and_vjp(
            expert_choice_fn("einsum", capacity, mask, slot_major=False), primals, [], cot
        )
        got, grads = value_and_vjp(
            expert_choice_fn(path, capacity, mask), primals, [], cot, compiled=compiled
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for name, g, w in zip(("x", "expert_outputs", "logits"), grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
            self.assertGreater(np.abs(w).max(), 0.0, name)


if __name__ == "__main__":
    absltest.main()
