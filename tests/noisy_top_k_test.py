"""Tests for tf_moe.routing.noisy_top_k against a numpy form of Shazeer et al.
2017 (eqs. 3-5 and appendix A).

Reference, per token x and expert i:
  H(x)_i = clean_i + eps_i * stddev_i, stddev_i = softplus((x W_noise)_i) + eps0
  G(x) = softmax over the k largest H(x) (0 elsewhere)
  Importance_i = sum_x G(x)_i, Load_i = sum_x P(x, i),
  P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / stddev_i),
where kth_excluding is computed literally: remove expert i, sort the others.
The losses are w * CV^2 with CV^2 = var / mean^2.
"""

import math

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.routing import NoisyTopKRouter, losses, noisy_top_k_gates

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------


def np_softmax(v):
    e = np.exp(v - np.max(v, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def np_softplus(v):
    return np.logaddexp(0.0, v)


_erf = np.vectorize(math.erf)


def np_phi(z):
    return 0.5 * (1.0 + _erf(np.asarray(z, np.float64) / math.sqrt(2.0)))


def np_cv_squared(v):
    v = np.asarray(v, np.float64)
    return v.var() / v.mean() ** 2


def kth_excluding(noisy_row, k, i):
    """k-th largest noisy logit among the experts other than i (-inf if none)."""
    others = np.sort(np.delete(noisy_row, i))[::-1]
    return others[k - 1] if k - 1 < len(others) else -np.inf


def np_noisy_top_k(clean, stddev, noise, k):
    """Returns (expert_index [G,S,k], gates [G,S,k], dense [G,S,E], load [G,S,E])."""
    clean = np.asarray(clean, np.float64)
    groups, group_size, num_experts = clean.shape
    if noise is None:
        noisy = clean
    else:
        noisy = clean + np.asarray(noise, np.float64) * np.asarray(stddev, np.float64)
    expert_index = np.argsort(-noisy, axis=-1, kind="stable")[..., :k]
    kept = np.take_along_axis(noisy, expert_index, axis=-1)
    gates = np_softmax(kept)
    dense = np.zeros_like(clean)
    np.put_along_axis(dense, expert_index, gates, axis=-1)
    selected = np.zeros_like(clean)
    np.put_along_axis(selected, expert_index, 1.0, axis=-1)
    if noise is None:
        return expert_index, gates, dense, selected
    load = np.zeros_like(clean)
    for g in range(groups):
        for s in range(group_size):
            for i in range(num_experts):
                threshold = kth_excluding(noisy[g, s], k, i)
                load[g, s, i] = np_phi((clean[g, s, i] - threshold) / stddev[g, s, i])
    return expert_index, gates, dense, load


def np_positions(expert_index, token_mask, num_experts):
    """Rank-major, token-order slots of real tokens' choices; -1 for padding."""
    groups, group_size, k = expert_index.shape
    position = np.full(expert_index.shape, -1)
    for g in range(groups):
        count = np.zeros(num_experts, int)
        for r in range(k):
            for s in range(group_size):
                if token_mask[g, s]:
                    e = expert_index[g, s, r]
                    position[g, s, r] = count[e]
                    count[e] += 1
    return position


def np_reference_route(x, kernel, noise_kernel, k, capacity, token_mask, noise=None,
                       noise_epsilon=1e-2, importance_w=0.1, load_w=0.1):
    """Full reference routing of the layer for given noise (None: eval)."""
    x = np.asarray(x, np.float64)
    clean = x @ kernel
    stddev = np_softplus(x @ noise_kernel) + noise_epsilon
    expert_index, gates, dense, load = np_noisy_top_k(clean, stddev, noise, k)
    position = np_positions(expert_index, token_mask, kernel.shape[1])
    kept = token_mask[..., None] & (position >= 0) & (position < capacity)
    real = token_mask.astype(bool)
    return {
        "expert_index": expert_index,
        "position": position,
        "dispatch_mask": kept,
        "combine_weight": np.where(kept, gates, 0.0),
        "router_probs": np_softmax(clean),
        "importance_loss": importance_w * np_cv_squared(dense[real].sum(axis=0)),
        "load_loss": load_w * np_cv_squared(load[real].sum(axis=0)),
    }


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def value_and_grad(fn, arg):
    """(fn(arg), d fn / d arg) on the current Keras backend."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        arg = tf.convert_to_tensor(arg)
        with tf.GradientTape() as tape:
            tape.watch(arg)
            value = fn(arg)
        return value, tape.gradient(value, arg)
    if keras.backend.backend() == "jax":
        import jax

        return jax.value_and_grad(fn)(ops.convert_to_tensor(arg))
    raise NotImplementedError(keras.backend.backend())


def make_router(k, num_experts, d, seed=0, kernel_scale=1.0, noise_scale=0.3, **kwargs):
    router = NoisyTopKRouter(k=k, num_experts=num_experts, seed=seed, **kwargs)
    router.build((None, None, d))
    rng = np.random.default_rng(seed + 1000)
    kernel = (kernel_scale * rng.normal(size=(d, num_experts))).astype(np.float32)
    noise_kernel = (noise_scale * rng.normal(size=(d, num_experts))).astype(np.float32)
    router.kernel.assign(kernel)
    router.noise_kernel.assign(noise_kernel)
    return router, kernel, noise_kernel


def check_slot_invariants(test, routing):
    """Kept slots of one expert in one group are 0..n-1, below capacity."""
    index = to_numpy(routing.expert_index)
    position = to_numpy(routing.position)
    kept = to_numpy(routing.dispatch_mask)
    weight = to_numpy(routing.combine_weight)
    token_mask = to_numpy(routing.token_mask)
    capacity = routing.capacity
    test.assertFalse(kept[~token_mask].any())
    np.testing.assert_array_equal(weight[~kept], 0.0)
    test.assertTrue((position[kept] < capacity).all())
    for g in range(index.shape[0]):
        for e in range(routing.num_experts):
            slots = np.sort(position[g][kept[g] & (index[g] == e)])
            np.testing.assert_array_equal(slots, np.arange(len(slots)))
    # Distinct experts per token.
    sorted_index = np.sort(index, axis=-1)
    test.assertTrue((np.diff(sorted_index, axis=-1) > 0).all())


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


class NoisyTopKGatesTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("k1_e4", 1, 4), ("k2_e4", 2, 4), ("k2_e8", 2, 8), ("k3_e6", 3, 6),
        ("k4_e8", 4, 8), ("k5_e6", 5, 6),
    )
    def test_matches_reference_with_noise(self, k, num_experts):
        rng = np.random.default_rng(k * 10 + num_experts)
        shape = (2, 16, num_experts)
        clean = rng.normal(size=shape).astype(np.float32)
        stddev = (np_softplus(rng.normal(size=shape)) + 1e-2).astype(np.float32)
        noise = rng.normal(size=shape).astype(np.float32)
        index, gates, dense, load = noisy_top_k_gates(clean, stddev, noise, k)
        ref_index, ref_gates, ref_dense, ref_load = np_noisy_top_k(
            clean, stddev, noise, k
        )
        np.testing.assert_array_equal(to_numpy(index), ref_index)
        np.testing.assert_allclose(to_numpy(gates), ref_gates, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(to_numpy(dense), ref_dense, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(to_numpy(load), ref_load, rtol=RTOL, atol=1e-5)
        # The load estimator is smooth: most entries strictly between 0 and 1.
        self.assertGreater(np.mean((ref_load > 1e-3) & (ref_load < 1 - 1e-3)), 0.2)

    @parameterized.named_parameters(("k1", 1), ("k2", 2), ("k3", 3))
    def test_no_noise_load_is_selection(self, k):
        rng = np.random.default_rng(k)
        clean = rng.normal(size=(3, 8, 5)).astype(np.float32)
        index, gates, dense, load = noisy_top_k_gates(clean, None, None, k)
        ref_index, ref_gates, ref_dense, ref_selected = np_noisy_top_k(
            clean, None, None, k
        )
        np.testing.assert_array_equal(to_numpy(index), ref_index)
        np.testing.assert_allclose(to_numpy(gates), ref_gates, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(to_numpy(dense), ref_dense, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(to_numpy(load), ref_selected)

    def test_k_equals_num_experts(self):
        rng = np.random.default_rng(3)
        shape = (2, 8, 4)
        clean = rng.normal(size=shape).astype(np.float32)
        stddev = np.full(shape, 0.7, np.float32)
        noise = rng.normal(size=shape).astype(np.float32)
        _, gates, dense, load = noisy_top_k_gates(clean, stddev, noise, 4)
        ref = np_noisy_top_k(clean, stddev, noise, 4)
        # Every expert is always selected: P(x, i) = 1; dense gates = softmax(H).
        np.testing.assert_allclose(to_numpy(load), ref[3], atol=ATOL)
        np.testing.assert_allclose(to_numpy(load), 1.0, atol=ATOL)
        np.testing.assert_allclose(
            to_numpy(dense), np_softmax(clean + noise * stddev), rtol=RTOL, atol=ATOL
        )

    def test_load_estimator_matches_monte_carlo(self):
        """P(x, i) is the probability that i stays in the top k when only its
        own noise is redrawn (appendix A); checked by sampling."""
        rng = np.random.default_rng(4)
        k, num_experts, draws = 2, 4, 20000
        clean = rng.normal(size=(1, 1, num_experts)).astype(np.float32)
        stddev = np.full((1, 1, num_experts), 0.8, np.float32)
        noise = rng.normal(size=(1, 1, num_experts)).astype(np.float32)
        _, _, _, load = noisy_top_k_gates(clean, stddev, noise, k)
        load = to_numpy(load)[0, 0]
        noisy = clean[0, 0] + noise[0, 0] * stddev[0, 0]
        for i in range(num_experts):
            redrawn = clean[0, 0, i] + rng.normal(size=draws) * stddev[0, 0, i]
            others = np.delete(noisy, i)
            kth = np.sort(others)[::-1][k - 1]
            self.assertAlmostEqual(np.mean(redrawn > kth), load[i], delta=0.02)


class NoisyTopKRouterTest(parameterized.TestCase):
    def test_zero_initialized_kernels(self):
        router = NoisyTopKRouter(k=2, num_experts=4)
        router.build((None, 12))
        for weight in (router.kernel, router.noise_kernel):
            value = to_numpy(weight)
            self.assertEqual(value.shape, (12, 4))
            self.assertEqual(value.dtype, np.float32)
            np.testing.assert_array_equal(value, 0.0)
        # Uniform routing at init in eval: gates 1/k, router probs 1/E.
        x = np.random.default_rng(0).normal(size=(2, 8, 12)).astype(np.float32)
        routing = router.route(x, capacity=8, training=False)
        np.testing.assert_allclose(to_numpy(routing.combine_weight), 0.5, rtol=RTOL)
        np.testing.assert_allclose(to_numpy(routing.router_probs), 0.25, rtol=RTOL)

    def test_zero_init_training_noise_breaks_ties(self):
        # softplus(0) + eps = 0.703: two training draws route differently.
        router = NoisyTopKRouter(k=2, num_experts=8, seed=1)
        x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
        a = router.route(x, capacity=16, training=True)
        b = router.route(x, capacity=16, training=True)
        self.assertFalse(
            np.array_equal(to_numpy(a.expert_index), to_numpy(b.expert_index))
        )
        for routing in (a, b):
            check_slot_invariants(self, routing)

    @parameterized.named_parameters(
        ("k1_e4", 1, 4, 16), ("k2_e8", 2, 8, 16), ("k3_e6", 3, 6, 32), ("k4_e8", 4, 8, 8)
    )
    def test_eval_route_matches_reference(self, k, num_experts, group_size):
        d = 12
        router, kernel, noise_kernel = make_router(k, num_experts, d, seed=k)
        rng = np.random.default_rng(k + 50)
        x = rng.normal(size=(2, group_size, d)).astype(np.float32)
        capacity = group_size
        routing = router.route(x, capacity=capacity, training=False)
        mask = np.ones((2, group_size), bool)
        ref = np_reference_route(x, kernel, noise_kernel, k, capacity, mask)
        np.testing.assert_array_equal(to_numpy(routing.expert_index), ref["expert_index"])
        np.testing.assert_array_equal(to_numpy(routing.position), ref["position"])
        np.testing.assert_array_equal(to_numpy(routing.dispatch_mask), ref["dispatch_mask"])
        np.testing.assert_allclose(
            to_numpy(routing.combine_weight), ref["combine_weight"], rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            to_numpy(routing.router_probs), ref["router_probs"], rtol=RTOL, atol=ATOL
        )
        self.assertEqual(set(routing.aux_losses), {"importance_loss", "load_loss"})
        self.assertEqual(tuple(router.loss_names), ("importance_loss", "load_loss"))
        for name in ("importance_loss", "load_loss"):
            np.testing.assert_allclose(
                to_numpy(routing.aux_losses[name]), ref[name], rtol=1e-4, err_msg=name
            )
        self.assertEqual(routing.capacity, capacity)
        self.assertEqual(routing.num_experts, num_experts)

    @parameterized.named_parameters(("k1", 1, 2), ("k2", 2, 3), ("k3", 3, 4))
    def test_capacity_drops_match_reference_order(self, k, capacity):
        d, num_experts, group_size = 8, 4, 16
        router, kernel, noise_kernel = make_router(k, num_experts, d, seed=10 + k)
        x = np.random.default_rng(k).normal(size=(3, group_size, d)).astype(np.float32)
        routing = router.route(x, capacity=capacity, training=False)
        mask = np.ones((3, group_size), bool)
        ref = np_reference_route(x, kernel, noise_kernel, k, capacity, mask)
        self.assertFalse(ref["dispatch_mask"].all())  # some choices are dropped
        np.testing.assert_array_equal(to_numpy(routing.position), ref["position"])
        np.testing.assert_array_equal(to_numpy(routing.dispatch_mask), ref["dispatch_mask"])
        np.testing.assert_allclose(
            to_numpy(routing.combine_weight), ref["combine_weight"], rtol=RTOL, atol=ATOL
        )
        # Requested = all choices of real tokens, before capacity.
        self.assertTrue(to_numpy(routing.requested_mask).all())
        check_slot_invariants(self, routing)

    @parameterized.named_parameters(("eval", False), ("training", True))
    def test_padding_never_routed(self, training):
        d, num_experts, group_size, k = 8, 4, 16, 2
        router, kernel, noise_kernel = make_router(k, num_experts, d, seed=3)
        rng = np.random.default_rng(9)
        x = rng.normal(size=(2, group_size, d)).astype(np.float32)
        mask = rng.random((2, group_size)) < 0.6
        mask[:, 0] = True
        mask[:, 1] = False
        routing = router.route(x, capacity=3, token_mask=mask, training=training)
        kept = to_numpy(routing.dispatch_mask)
        self.assertFalse(kept[~mask].any())
        self.assertFalse(to_numpy(routing.requested_mask)[~mask].any())
        np.testing.assert_array_equal(to_numpy(routing.combine_weight)[~mask], 0.0)
        self.assertTrue(to_numpy(routing.requested_mask)[mask].all())
        check_slot_invariants(self, routing)
        if not training:
            ref = np_reference_route(x, kernel, noise_kernel, k, 3, mask)
            np.testing.assert_array_equal(kept, ref["dispatch_mask"])
            np.testing.assert_array_equal(
                np.where(ref["dispatch_mask"], to_numpy(routing.position), -1),
                np.where(ref["dispatch_mask"], ref["position"], -1),
            )
            for name in ("importance_loss", "load_loss"):
                np.testing.assert_allclose(
                    to_numpy(routing.aux_losses[name]), ref[name], rtol=1e-4
                )

    @parameterized.named_parameters(("k1", 1), ("k2", 2), ("k3", 3))
    def test_training_losses_with_explicit_noise(self, k):
        """Training-mode gates from explicit noise: w * CV^2 of the reference's
        importance and load, through the pure gate function and the loss
        functions the router uses."""
        d, num_experts, group_size = 8, 6, 16
        _, kernel, noise_kernel = make_router(k, num_experts, d, seed=20 + k)
        rng = np.random.default_rng(k + 7)
        x = rng.normal(size=(2, group_size, d)).astype(np.float32)
        noise = rng.normal(size=(2, group_size, num_experts)).astype(np.float32)
        mask = np.ones((2, group_size), bool)
        mask[1, -5:] = False
        clean = (x @ kernel).astype(np.float32)
        stddev = (np_softplus(x @ noise_kernel) + 1e-2).astype(np.float32)
        _, _, dense, load = noisy_top_k_gates(clean, stddev, noise, k)
        w_importance, w_load = 0.1, 0.25
        got_importance = w_importance * to_numpy(losses.importance_loss(dense, mask))
        got_load = w_load * to_numpy(losses.load_loss(load, mask))
        _, _, ref_dense, ref_load = np_noisy_top_k(clean, stddev, noise, k)
        np.testing.assert_allclose(
            got_importance,
            w_importance * np_cv_squared(ref_dense[mask].sum(axis=0)),
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            got_load, w_load * np_cv_squared(ref_load[mask].sum(axis=0)), rtol=1e-4
        )

    @parameterized.named_parameters(("k1", 1), ("k2", 2), ("k3", 3))
    def test_training_losses_of_layer_with_negligible_noise(self, k):
        """The layer's training path: with a noise kernel that makes
        softplus(x W_noise) ~ 1e-26 (via a constant input feature) and no
        epsilon, the noise cannot move any logit, so the layer's weighted
        losses must equal the reference's, with P(x, i) -> 0/1."""
        d, num_experts, group_size = 8, 6, 16
        router, kernel, _ = make_router(
            k, num_experts, d, seed=30 + k, noise_epsilon=0.0,
            importance_loss_weight=0.3, load_loss_weight=0.2,
        )
        noise_kernel = np.zeros((d, num_experts), np.float32)
        noise_kernel[0] = -60.0
        router.noise_kernel.assign(noise_kernel)
        rng = np.random.default_rng(k)
        x = rng.normal(size=(2, group_size, d)).astype(np.float32)
        x[..., 0] = 1.0
        mask = np.ones((2, group_size), bool)
        mask[0, -3:] = False
        routing = router.route(x, capacity=group_size, token_mask=mask, training=True)
        # Reference at zero noise, same tiny stddev.
        ref = np_reference_route(
            x, kernel, noise_kernel, k, group_size, mask,
            noise=np.zeros((2, group_size, num_experts)), noise_epsilon=0.0,
            importance_w=0.3, load_w=0.2,
        )
        np.testing.assert_array_equal(to_numpy(routing.expert_index), ref["expert_index"])
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["importance_loss"]), ref["importance_loss"],
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["load_loss"]), ref["load_loss"], rtol=1e-4
        )

    def test_training_noise_changes_routing_between_draws(self):
        d, num_experts, group_size, k = 8, 8, 32, 2
        router, kernel, noise_kernel = make_router(
            k, num_experts, d, seed=4, kernel_scale=0.3, noise_scale=0.3
        )
        x = np.random.default_rng(2).normal(size=(2, group_size, d)).astype(np.float32)
        a = router.route(x, capacity=6, training=True)
        b = router.route(x, capacity=6, training=True)
        e = router.route(x, capacity=6, training=False)
        self.assertFalse(np.array_equal(to_numpy(a.expert_index), to_numpy(b.expert_index)))
        self.assertFalse(np.array_equal(to_numpy(a.expert_index), to_numpy(e.expert_index)))
        for routing in (a, b):
            check_slot_invariants(self, routing)
            # Gates of the k choices: softmax of noisy logits, summing to 1.
            weights = to_numpy(routing.combine_weight)
            kept = to_numpy(routing.dispatch_mask)
            full = kept.all(axis=-1)
            np.testing.assert_allclose(weights[full].sum(axis=-1), 1.0, rtol=1e-5)
            # Router probs are the clean softmax, unaffected by noise.
            np.testing.assert_allclose(
                to_numpy(routing.router_probs), np_softmax(x.astype(np.float64) @ kernel),
                rtol=1e-5, atol=ATOL,
            )
        # Eval is deterministic.
        e2 = router.route(x, capacity=6, training=False)
        np.testing.assert_array_equal(to_numpy(e.expert_index), to_numpy(e2.expert_index))

    def test_load_loss_gradient_wrt_noise_kernel(self):
        d, num_experts, group_size, k = 8, 6, 16, 2
        router, _, noise_kernel = make_router(
            k, num_experts, d, seed=5, kernel_scale=0.1, noise_scale=0.1
        )
        x = np.random.default_rng(6).normal(size=(2, group_size, d)).astype(np.float32)
        seed_state = ops.convert_to_tensor(to_numpy(router.seed_generator.state))

        def load_loss(w_noise):
            # Same noise draw every call: the seed state is fixed too.
            with keras.StatelessScope(
                state_mapping=[
                    (router.noise_kernel, w_noise),
                    (router.seed_generator.state, seed_state),
                ]
            ):
                routing = router.route(x, capacity=group_size, training=True)
            return routing.aux_losses["load_loss"]

        value, grad = value_and_grad(load_loss, noise_kernel)
        grad = to_numpy(grad)
        self.assertEqual(grad.shape, (d, num_experts))
        self.assertTrue(np.isfinite(grad).all())
        self.assertGreater(np.abs(grad).max(), 1e-6)
        # Directional central finite differences with the same noise draw:
        # along the gradient (slope |grad|) and along a random direction.
        grad_norm = float(np.linalg.norm(grad))
        random_direction = np.random.default_rng(7).normal(size=(d, num_experts))
        h = 1e-2
        for direction in (grad, random_direction):
            direction = (direction / np.linalg.norm(direction)).astype(np.float32)
            plus = float(to_numpy(load_loss(noise_kernel + h * direction)))
            minus = float(to_numpy(load_loss(noise_kernel - h * direction)))
            numeric = (plus - minus) / (2 * h)
            analytic = float(np.sum(grad * direction))
            self.assertLess(abs(analytic - numeric), 0.05 * grad_norm)
        np.testing.assert_allclose(
            to_numpy(value), to_numpy(load_loss(noise_kernel)), rtol=1e-6
        )

    def test_importance_loss_gradient_wrt_kernel(self):
        d, num_experts, group_size, k = 8, 6, 16, 2
        router, kernel, _ = make_router(
            k, num_experts, d, seed=8, kernel_scale=0.1, noise_scale=0.1
        )
        x = np.random.default_rng(8).normal(size=(2, group_size, d)).astype(np.float32)

        def importance(w_gate):
            with keras.StatelessScope(state_mapping=[(router.kernel, w_gate)]):
                routing = router.route(x, capacity=group_size, training=False)
            return routing.aux_losses["importance_loss"]

        _, grad = value_and_grad(importance, kernel)
        grad = to_numpy(grad)
        self.assertTrue(np.isfinite(grad).all())
        self.assertGreater(np.abs(grad).max(), 1e-6)


if __name__ == "__main__":
    absltest.main()
