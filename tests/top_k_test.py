"""Tests for tf_moe.routing.top_k (Switch k=1, GShard k=2, general k) against
a numpy reference written from the papers.

Reference: p = softmax(x W); each token takes its k most probable experts with
weights p (optionally renormalized to sum to 1, GShard). Slots are filled rank
by rank (all first choices, then all second ...) in token order, or, with
batch-prioritized routing (Riquelme et al. 2021), in descending order of the
token's top-1 router probability; choices at slot >= C are dropped.
Balance loss alpha * E * sum_i f_i P_i (Fedus et al. 2021); z-loss
w * mean_x logsumexp(logits)^2 (Zoph et al. 2022). GShard's random policy keeps
the second choice with probability min(1, 2 g2 / (g1 + g2)) in training.
"""

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.routing import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    TopKRouter,
    top_k_routing,
)

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------


def np_softmax(v):
    e = np.exp(v - np.max(v, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def np_logsumexp(v):
    top = np.max(v, axis=-1, keepdims=True)
    return np.log(np.sum(np.exp(v - top), axis=-1)) + top[..., 0]


def np_top_k_route(
    logits,
    k,
    capacity,
    token_mask,
    keep_second=None,
    normalize_weights=False,
    batch_prioritized=False,
    balance_w=1e-2,
    z_w=1e-3,
):
    logits = np.asarray(logits, np.float64)
    groups, group_size, num_experts = logits.shape
    probs = np_softmax(logits)
    expert_index = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    weights = np.take_along_axis(probs, expert_index, axis=-1)
    if normalize_weights:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    requested = np.repeat(token_mask[..., None], k, axis=-1)
    if keep_second is not None:
        requested[..., 1] &= keep_second
    top1_prob = probs.max(axis=-1)  # [G, S]
    position = np.full(expert_index.shape, -1)
    for g in range(groups):
        if batch_prioritized:
            order = sorted(range(group_size), key=lambda s: -top1_prob[g, s])
        else:
            order = range(group_size)
        count = np.zeros(num_experts, int)
        for r in range(k):
            for s in order:
                if requested[g, s, r]:
                    e = expert_index[g, s, r]
                    position[g, s, r] = count[e]
                    count[e] += 1
    kept = requested & (position < capacity)
    real = token_mask.astype(bool)
    f = np.bincount(expert_index[..., 0][real], minlength=num_experts) / real.sum()
    p_mean = probs[real].mean(axis=0)
    return {
        "probs": probs,
        "expert_index": expert_index,
        "weights": weights,
        "position": position,
        "requested": requested,
        "kept": kept,
        "combine_weight": np.where(kept, weights, 0.0),
        "balance_loss": balance_w * num_experts * np.sum(f * p_mean),
        "z_loss": z_w * np.mean(np_logsumexp(logits)[real] ** 2),
    }


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def make_router(k, num_experts, d, seed=0, scale=1.0, **kwargs):
    router = TopKRouter(k=k, num_experts=num_experts, seed=seed, **kwargs)
    router.build((None, None, d))
    rng = np.random.default_rng(seed + 500)
    kernel = (scale * rng.normal(size=(d, num_experts)) / np.sqrt(d)).astype(np.float32)
    router.kernel.assign(kernel)
    return router, kernel


def random_inputs(seed, groups, group_size, d, padding=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, group_size, d)).astype(np.float32)
    mask = np.ones((groups, group_size), bool)
    if padding:
        mask = rng.random((groups, group_size)) < 0.7
        mask[:, 0] = True
        mask[:, -1] = False
    return x, mask


def assert_routing_matches(test, routing, ref, check_position_everywhere=True):
    np.testing.assert_array_equal(to_numpy(routing.expert_index), ref["expert_index"])
    np.testing.assert_array_equal(to_numpy(routing.requested_mask), ref["requested"])
    np.testing.assert_array_equal(to_numpy(routing.dispatch_mask), ref["kept"])
    if check_position_everywhere:
        np.testing.assert_array_equal(to_numpy(routing.position), ref["position"])
    else:
        kept = ref["kept"]
        np.testing.assert_array_equal(to_numpy(routing.position)[kept], ref["position"][kept])
    np.testing.assert_allclose(
        to_numpy(routing.combine_weight), ref["combine_weight"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        to_numpy(routing.router_probs), ref["probs"], rtol=RTOL, atol=ATOL
    )


def check_slot_invariants(test, routing):
    index = to_numpy(routing.expert_index)
    position = to_numpy(routing.position)
    kept = to_numpy(routing.dispatch_mask)
    token_mask = to_numpy(routing.token_mask)
    test.assertFalse(kept[~token_mask].any())
    np.testing.assert_array_equal(to_numpy(routing.combine_weight)[~kept], 0.0)
    test.assertTrue((position[kept] < routing.capacity).all())
    for g in range(index.shape[0]):
        for e in range(routing.num_experts):
            slots = np.sort(position[g][kept[g] & (index[g] == e)])
            np.testing.assert_array_equal(slots, np.arange(len(slots)))


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


class TopKRouterTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("switch_k1", 1, 4, 16, 5, False),
        ("switch_k1_pad", 1, 8, 16, 2, True),
        ("gshard_k2", 2, 4, 16, 6, False),
        ("gshard_k2_pad", 2, 8, 16, 3, True),
        ("k3_pad", 3, 6, 16, 4, True),
        ("k2_no_drop", 2, 4, 16, 16, True),
    )
    def test_eval_matches_reference(self, k, num_experts, group_size, capacity, pad):
        d = 8
        router, kernel = make_router(k, num_experts, d, seed=k, scale=2.0)
        x, mask = random_inputs(k + capacity, 2, group_size, d, padding=pad)
        routing = router.route(x, capacity=capacity, token_mask=mask, training=False)
        ref = np_top_k_route(x.astype(np.float64) @ kernel, k, capacity, mask)
        assert_routing_matches(self, routing, ref)
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["balance_loss"]), ref["balance_loss"], rtol=1e-4
        )
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["z_loss"]), ref["z_loss"], rtol=1e-4
        )
        self.assertEqual(routing.capacity, capacity)
        self.assertEqual(routing.num_experts, num_experts)
        np.testing.assert_array_equal(to_numpy(routing.token_mask), mask)
        check_slot_invariants(self, routing)
        if capacity < group_size:
            self.assertFalse(ref["kept"][mask].all())  # exercises dropping

    @parameterized.named_parameters(("e4", 4, 8), ("e6", 6, 16))
    def test_k_equals_num_experts_is_dense_softmax(self, num_experts, group_size):
        d = 8
        router, kernel = make_router(num_experts, num_experts, d, seed=1)
        x, mask = random_inputs(3, 2, group_size, d)
        routing = router.route(x, capacity=group_size, training=False)
        self.assertTrue(to_numpy(routing.dispatch_mask).all())
        # Scatter the combine weights back to [G, S, E]: the full softmax.
        dense = np.zeros((2, group_size, num_experts))
        np.put_along_axis(
            dense, to_numpy(routing.expert_index), to_numpy(routing.combine_weight), -1
        )
        np.testing.assert_allclose(
            dense, np_softmax(x.astype(np.float64) @ kernel), rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(dense.sum(axis=-1), 1.0, rtol=RTOL)

    @parameterized.named_parameters(("k2", 2), ("k3", 3))
    def test_normalize_weights(self, k):
        d, num_experts, group_size, capacity = 8, 6, 16, 16
        router, kernel = make_router(k, num_experts, d, seed=2, normalize_weights=True)
        x, mask = random_inputs(4, 2, group_size, d, padding=True)
        routing = router.route(x, capacity=capacity, token_mask=mask, training=False)
        ref = np_top_k_route(
            x.astype(np.float64) @ kernel, k, capacity, mask, normalize_weights=True
        )
        assert_routing_matches(self, routing, ref)
        weights = to_numpy(routing.combine_weight)
        np.testing.assert_allclose(weights[mask].sum(axis=-1), 1.0, rtol=RTOL)
        # Unnormalized weights would not sum to 1.
        self.assertTrue((ref["probs"].max(axis=-1)[mask] < 0.999).all())

    @parameterized.named_parameters(
        ("k1", 1, False), ("k2", 2, False), ("k2_pad", 2, True), ("k3", 3, False),
    )
    def test_batch_prioritized_routing(self, k, pad):
        self._check_batch_prioritized(k, pad, normalize=False)

    def test_batch_prioritized_routing_with_normalized_weights(self):
        """The priority is the top-1 router probability (DESIGN.md section 4,
        V-MoE), also when the combine weights are renormalized: the normalized
        top-1 weight g1 / (g1 + g2) orders tokens differently."""
        self._check_batch_prioritized(2, False, normalize=True)

    def _check_batch_prioritized(self, k, pad, normalize):
        d, num_experts, group_size, capacity = 8, 4, 32, 5
        router, kernel = make_router(
            k, num_experts, d, seed=3, scale=3.0,
            batch_prioritized_routing=True, normalize_weights=normalize,
        )
        x, mask = random_inputs(5 + k, 3, group_size, d, padding=pad)
        routing = router.route(x, capacity=capacity, token_mask=mask, training=False)
        ref = np_top_k_route(
            x.astype(np.float64) @ kernel, k, capacity, mask,
            normalize_weights=normalize, batch_prioritized=True,
        )
        # Positions of padding are unspecified beyond "not kept".
        assert_routing_matches(self, routing, ref, check_position_everywhere=False)
        check_slot_invariants(self, routing)
        # Differs from token-order routing for this draw.
        plain = np_top_k_route(
            x.astype(np.float64) @ kernel, k, capacity, mask, normalize_weights=normalize
        )
        self.assertFalse(np.array_equal(plain["kept"], ref["kept"]))
        # First choices: a dropped token never has a higher top-1 probability
        # than a kept token of the same expert and group.
        top1 = ref["probs"].max(axis=-1)
        index = to_numpy(routing.expert_index)[..., 0]
        kept = to_numpy(routing.dispatch_mask)[..., 0]
        for g in range(3):
            for e in range(num_experts):
                sel = mask[g] & (index[g] == e)
                kept_p = top1[g][sel & kept[g]]
                dropped_p = top1[g][sel & ~kept[g]]
                if len(dropped_p):
                    self.assertEqual(len(kept_p), capacity)
                    self.assertGreater(kept_p.min(), dropped_p.max())

    def test_balance_loss_weight(self):
        d, num_experts, group_size = 8, 4, 16
        router, kernel = make_router(
            1, num_experts, d, seed=4, balance_loss_weight=0.37, z_loss_weight=0.0
        )
        x, mask = random_inputs(6, 2, group_size, d, padding=True)
        routing = router.route(x, capacity=4, token_mask=mask, training=False)
        ref = np_top_k_route(x.astype(np.float64) @ kernel, 1, 4, mask, balance_w=0.37)
        self.assertEqual(set(routing.aux_losses), {"balance_loss"})
        self.assertEqual(tuple(router.loss_names), ("balance_loss",))
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["balance_loss"]), ref["balance_loss"], rtol=1e-4
        )
        # f counts first choices regardless of capacity: recompute by hand.
        probs = ref["probs"]
        first = probs.argmax(axis=-1)
        f = np.array([(first[mask] == e).mean() for e in range(num_experts)])
        np.testing.assert_allclose(
            ref["balance_loss"], 0.37 * num_experts * np.sum(f * probs[mask].mean(0)),
            rtol=1e-12,
        )

    def test_no_losses_when_weights_zero(self):
        router, _ = make_router(2, 4, 8, balance_loss_weight=0.0, z_loss_weight=0.0)
        x, _ = random_inputs(0, 2, 8, 8)
        routing = router.route(x, capacity=4, training=True)
        self.assertEqual(routing.aux_losses, {})
        self.assertEqual(tuple(router.loss_names), ())

    @parameterized.named_parameters(("w_default", 1e-3), ("w_half", 0.5))
    def test_z_loss(self, weight):
        d, num_experts, group_size = 8, 6, 16
        router, kernel = make_router(
            2, num_experts, d, seed=5, scale=4.0, z_loss_weight=weight
        )
        x, mask = random_inputs(7, 3, group_size, d, padding=True)
        x[~mask] = 100.0  # padding must not count
        routing = router.route(x, capacity=4, token_mask=mask, training=False)
        ref = np_top_k_route(x.astype(np.float64) @ kernel, 2, 4, mask, z_w=weight)
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["z_loss"]), ref["z_loss"], rtol=1e-4
        )

    def test_second_expert_random_policy_statistics(self):
        """Training keeps the second choice with probability
        min(1, 2 g2 / (g1 + g2)); checked on ~20k tokens."""
        d, num_experts, groups, group_size = 8, 4, 4, 5000
        router, kernel = make_router(
            2, num_experts, d, seed=6, scale=4.0, second_expert_policy="random"
        )
        x, mask = random_inputs(8, groups, group_size, d)
        routing = router.route(x, capacity=group_size, training=True)
        requested = to_numpy(routing.requested_mask)
        kept = to_numpy(routing.dispatch_mask)
        probs = np_softmax(x.astype(np.float64) @ kernel)
        top2 = -np.sort(-probs, axis=-1)[..., :2]
        keep_prob = np.minimum(1.0, 2.0 * top2[..., 1] / top2.sum(axis=-1))
        self.assertLess(keep_prob.mean(), 0.8)  # the policy matters here
        self.assertTrue(requested[..., 0].all())  # first choice always kept
        np.testing.assert_array_equal(kept, requested)  # capacity = S
        keep = requested[..., 1]
        self.assertAlmostEqual(keep.mean(), keep_prob.mean(), delta=0.03)
        # The keep rate follows the per-token probability, not just its mean.
        for low, high in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.01)):
            sel = (keep_prob >= low) & (keep_prob < high)
            self.assertGreater(sel.sum(), 1000)
            self.assertAlmostEqual(keep[sel].mean(), keep_prob[sel].mean(), delta=0.04)
        # Dropped second choices carry no weight.
        np.testing.assert_array_equal(to_numpy(routing.combine_weight)[..., 1][~keep], 0.0)
        # The rest of the routing equals the reference given the same keeps.
        ref = np_top_k_route(
            x.astype(np.float64) @ kernel, 2, group_size, mask, keep_second=keep
        )
        assert_routing_matches(self, routing, ref, check_position_everywhere=False)
        # Evaluation keeps every second choice.
        evaluation = router.route(x, capacity=group_size, training=False)
        self.assertTrue(to_numpy(evaluation.requested_mask).all())
        self.assertTrue(to_numpy(evaluation.dispatch_mask).all())

    def test_second_expert_random_policy_with_capacity(self):
        d, num_experts, group_size, capacity = 8, 4, 32, 6
        router, kernel = make_router(
            2, num_experts, d, seed=7, scale=3.0, second_expert_policy="sampling"
        )
        x, mask = random_inputs(9, 3, group_size, d, padding=True)
        routing = router.route(x, capacity=capacity, token_mask=mask, training=True)
        keep = to_numpy(routing.requested_mask)[..., 1]
        self.assertFalse(keep[mask].all())
        ref = np_top_k_route(
            x.astype(np.float64) @ kernel, 2, capacity, mask, keep_second=keep
        )
        # Unrequested second choices take no slot: later choices move up.
        assert_routing_matches(self, routing, ref, check_position_everywhere=False)
        check_slot_invariants(self, routing)

    def test_jitter_noise_only_in_training(self):
        # d = 1 so the multiplicative jitter u of each token can be read back
        # from the router probabilities: log p_1 - log p_0 = u x (W_1 - W_0).
        jitter, num_experts, group_size = 0.2, 4, 64
        router, kernel = make_router(
            1, num_experts, 1, seed=8, scale=1.0, jitter_noise=jitter
        )
        rng = np.random.default_rng(10)
        x = rng.uniform(1.0, 2.0, size=(2, group_size, 1)).astype(np.float32)
        mask = np.ones((2, group_size), bool)
        evaluation = router.route(x, capacity=group_size, training=False)
        ref = np_top_k_route(x.astype(np.float64) @ kernel, 1, group_size, mask)
        assert_routing_matches(self, evaluation, ref)
        training = router.route(x, capacity=group_size, training=True)
        probs = to_numpy(training.router_probs).astype(np.float64)
        u = (np.log(probs[..., 1]) - np.log(probs[..., 0])) / (
            x[..., 0] * (kernel[0, 1] - kernel[0, 0])
        )
        self.assertTrue((u > 1 - jitter - 1e-4).all() and (u < 1 + jitter + 1e-4).all())
        self.assertGreater(u.std(), 0.05)  # Uniform(0.8, 1.2) has std 0.115
        # Training without jitter is the eval routing.
        plain, _ = make_router(1, num_experts, 1, seed=8, scale=1.0, jitter_noise=0.0)
        no_jitter = plain.route(x, capacity=group_size, training=True)
        assert_routing_matches(self, no_jitter, ref)

    def test_pure_function_matches_reference(self):
        rng = np.random.default_rng(12)
        logits = rng.normal(scale=2.0, size=(2, 16, 5))
        mask = rng.random((2, 16)) < 0.8
        keep_second = rng.random((2, 16)) < 0.5
        probs = np_softmax(logits).astype(np.float32)
        routing = top_k_routing(
            probs, 2, 4, mask, keep_second=keep_second, batch_prioritized=True
        )
        expert_index, position = routing.expert_index, routing.position
        requested, kept = routing.requested_mask, routing.dispatch_mask
        # Dropped choices keep their gate value only until capacity applies.
        weights = np.where(to_numpy(kept), to_numpy(routing.combine_weight), 0.0)
        # softmax(log p) = p: the reference routes the same probabilities.
        ref = np_top_k_route(
            np.log(probs.astype(np.float64)), 2, 4, mask,
            keep_second=keep_second, batch_prioritized=True,
        )
        np.testing.assert_array_equal(to_numpy(expert_index), ref["expert_index"])
        np.testing.assert_allclose(
            weights, np.where(ref["kept"], ref["weights"], 0.0), rtol=1e-5, atol=ATOL
        )
        np.testing.assert_array_equal(to_numpy(requested), ref["requested"])
        np.testing.assert_array_equal(to_numpy(kept), ref["kept"])
        np.testing.assert_array_equal(
            to_numpy(position)[ref["requested"]], ref["position"][ref["requested"]]
        )


class MixedPrecisionTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self._policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    def tearDown(self):
        keras.mixed_precision.set_global_policy(self._policy)
        super().tearDown()

    @parameterized.named_parameters(
        ("top_k", lambda: TopKRouter(k=2, num_experts=4), 2),
        ("noisy_top_k", lambda: NoisyTopKRouter(k=2, num_experts=4), 2),
        ("expert_choice", lambda: ExpertChoiceRouter(num_experts=4), 4),
    )
    def test_float32_routing_under_mixed_bfloat16(self, make, k):
        d, group_size = 8, 16
        router = make()
        x = keras.random.normal((2, group_size, d), dtype="bfloat16", seed=1)
        self.assertEqual(keras.backend.standardize_dtype(x.dtype), "bfloat16")
        logits = router(x)
        self.assertEqual(router.kernel.dtype, "float32")
        self.assertEqual(keras.backend.standardize_dtype(logits.dtype), "float32")
        kernel = np.random.default_rng(0).normal(size=(d, 4)).astype(np.float32)
        router.kernel.assign(kernel)
        for training in (False, True):
            routing = router.route(x, capacity=4, training=training)
            for name in ("combine_weight", "router_probs"):
                self.assertEqual(
                    keras.backend.standardize_dtype(getattr(routing, name).dtype),
                    "float32", name,
                )
            for name, loss in routing.aux_losses.items():
                self.assertEqual(keras.backend.standardize_dtype(loss.dtype), "float32", name)
            self.assertEqual(
                keras.backend.standardize_dtype(routing.expert_index.dtype), "int32"
            )
        # float32 math: probabilities equal the float32 softmax of the
        # bf16-rounded inputs to float32 precision, not bf16 precision.
        routing = router.route(x, capacity=4, training=False)
        x32 = to_numpy(ops.cast(x, "float32")).astype(np.float64)
        np.testing.assert_allclose(
            to_numpy(routing.router_probs), np_softmax(x32 @ kernel), rtol=1e-5, atol=1e-6
        )

    def test_top_k_matches_float32_reference_under_mixed_policy(self):
        d, num_experts, group_size, capacity = 8, 4, 16, 5
        router = TopKRouter(k=2, num_experts=num_experts, seed=0)
        x = keras.random.normal((2, group_size, d), dtype="bfloat16", seed=2)
        router.build(x.shape)
        kernel = np.random.default_rng(1).normal(size=(d, num_experts)).astype(np.float32)
        router.kernel.assign(kernel)
        routing = router.route(x, capacity=capacity, training=False)
        x32 = to_numpy(ops.cast(x, "float32")).astype(np.float64)
        ref = np_top_k_route(x32 @ kernel, 2, capacity, np.ones((2, group_size), bool))
        assert_routing_matches(self, routing, ref)


if __name__ == "__main__":
    absltest.main()
