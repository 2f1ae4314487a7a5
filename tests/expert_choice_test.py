"""Tests for tf_moe.routing.expert_choice against a numpy reference of Zhou et
al. 2022: scores = softmax over experts; each expert takes the C tokens of its
group with the highest score for it (argsort); the weight of a chosen
(token, expert) pair is the score; a token may get 0..E experts. Padding
tokens are never chosen.
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.routing import ExpertChoiceRouter, expert_choice_routing

RTOL = 1e-5
ATOL = 1e-6


def np_softmax(v):
    e = np.exp(v - np.max(v, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def np_expert_choice(probs, capacity, token_mask):
    """Returns (rank [G, S, E] (-1 where not chosen), chosen, weights)."""
    groups, group_size, num_experts = probs.shape
    rank = np.full(probs.shape, -1)
    for g in range(groups):
        real = np.flatnonzero(token_mask[g])
        for e in range(num_experts):
            order = real[np.argsort(-probs[g, real, e], kind="stable")]
            for slot, s in enumerate(order[:capacity]):
                rank[g, s, e] = slot
    chosen = rank >= 0
    return rank, chosen, np.where(chosen, probs, 0.0)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def make_router(num_experts, d, seed=0, scale=2.0, **kwargs):
    router = ExpertChoiceRouter(num_experts=num_experts, seed=seed, **kwargs)
    router.build((None, None, d))
    rng = np.random.default_rng(seed + 300)
    kernel = (scale * rng.normal(size=(d, num_experts)) / np.sqrt(d)).astype(np.float32)
    router.kernel.assign(kernel)
    return router, kernel


def token_view(probs, capacity, mask):
    """(position, chosen, weights) [G, S, E]: the token-major view of the
    slot-major routing, after checking that both views agree."""
    routing = expert_choice_routing(probs, capacity, mask)
    slot_token, slot_weight = to_numpy(routing.slot_token), to_numpy(routing.slot_weight)
    position, chosen = to_numpy(routing.position), to_numpy(routing.dispatch_mask)
    weights = to_numpy(routing.combine_weight)
    group_size = probs.shape[1]
    from_slots = np.zeros(chosen.shape, bool)
    for g, e, c in zip(*np.nonzero(slot_token < group_size)):
        s = slot_token[g, e, c]
        from_slots[g, s, e] = True
        assert position[g, s, e] == c, (g, e, c)
        np.testing.assert_allclose(weights[g, s, e], slot_weight[g, e, c], rtol=1e-6)
    np.testing.assert_array_equal(from_slots, chosen)
    np.testing.assert_array_equal(slot_weight[slot_token == group_size], 0.0)
    return position, chosen, weights


class ExpertChoiceRoutingTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("g2_s8_e4_c2", 2, 8, 4, 2),
        ("g3_s16_e8_c4", 3, 16, 8, 4),
        ("g2_s32_e4_c16", 2, 32, 4, 16),
        ("c_equals_s", 2, 8, 4, 8),
        ("c1", 2, 16, 6, 1),
    )
    def test_matches_reference(self, groups, group_size, num_experts, capacity):
        rng = np.random.default_rng(group_size + capacity)
        probs = np_softmax(rng.normal(scale=2.0, size=(groups, group_size, num_experts)))
        probs = probs.astype(np.float32)
        mask = np.ones((groups, group_size), bool)
        position, chosen, weights = token_view(probs, capacity, mask)
        ref_rank, ref_chosen, ref_weights = np_expert_choice(probs, capacity, mask)
        np.testing.assert_array_equal(to_numpy(chosen), ref_chosen)
        np.testing.assert_array_equal(to_numpy(position)[ref_chosen], ref_rank[ref_chosen])
        np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=RTOL, atol=ATOL)
        # Every expert is exactly full.
        np.testing.assert_array_equal(to_numpy(chosen).sum(axis=1), capacity)

    @parameterized.named_parameters(
        ("c_below_real", 8, 2), ("c_equals_real", 16, 5), ("c_above_real", 16, 12),
        ("c_equals_s", 8, 8),
    )
    def test_padding_never_chosen(self, group_size, capacity):
        groups, num_experts = 2, 4
        rng = np.random.default_rng(group_size * capacity)
        probs = np_softmax(rng.normal(size=(groups, group_size, num_experts)))
        probs = probs.astype(np.float32)
        mask = np.zeros((groups, group_size), bool)
        mask[0, [0, 2, 3, 6]] = True  # 4 real tokens
        mask[1, :5] = True  # 5 real tokens
        # Padding gets the highest probability for every expert: it would be
        # chosen first if the mask were ignored.
        probs[~mask] = 0.99
        position, chosen, weights = token_view(probs, capacity, mask)
        chosen = to_numpy(chosen)
        self.assertFalse(chosen[~mask].any())
        np.testing.assert_array_equal(to_numpy(weights)[~mask], 0.0)
        # Each expert takes min(C, number of real tokens) tokens.
        for g in range(groups):
            n_real = int(mask[g].sum())
            np.testing.assert_array_equal(chosen[g].sum(axis=0), min(capacity, n_real))
        ref_rank, ref_chosen, ref_weights = np_expert_choice(probs, capacity, mask)
        np.testing.assert_array_equal(chosen, ref_chosen)
        np.testing.assert_array_equal(to_numpy(position)[ref_chosen], ref_rank[ref_chosen])
        np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=RTOL, atol=ATOL)

    def test_token_may_get_zero_to_all_experts(self):
        probs = np.array(
            [[[0.34, 0.33, 0.33],  # t0: runner-up of every expert
              [0.10, 0.10, 0.80],  # t1: favourite of e2
              [0.80, 0.10, 0.10],  # t2: favourite of e0
              [0.30, 0.40, 0.30]]],  # t3: favourite of e1
            np.float32,
        )
        mask = np.ones((1, 4), bool)
        # C = 2: every expert takes its favourite and t0, so t0 gets all E.
        _, chosen, weights = token_view(probs, 2, mask)
        expected = np.array(
            [[True, True, True], [False, False, True], [True, False, False],
             [False, True, False]]
        )
        np.testing.assert_array_equal(to_numpy(chosen)[0], expected)
        np.testing.assert_allclose(
            to_numpy(weights)[0], np.where(expected, probs[0], 0.0), rtol=RTOL
        )
        # C = 1: only the favourites; t0 gets no expert.
        _, chosen, _ = token_view(probs, 1, mask)
        np.testing.assert_array_equal(to_numpy(chosen)[0].sum(axis=1), [0, 1, 1, 1])

    def test_experts_per_token_vary(self):
        groups, group_size, num_experts, capacity = 3, 32, 8, 8
        rng = np.random.default_rng(1)
        probs = np_softmax(rng.normal(scale=2.0, size=(groups, group_size, num_experts)))
        probs = probs.astype(np.float32)
        mask = np.ones((groups, group_size), bool)
        _, chosen, _ = token_view(probs, capacity, mask)
        counts = to_numpy(chosen).sum(axis=-1)  # [G, S]
        # On average C * E / S = 2 experts per token, but not for every token.
        np.testing.assert_allclose(counts.mean(), capacity * num_experts / group_size)
        self.assertLess(counts.min(), counts.max())
        _, ref_chosen, _ = np_expert_choice(probs, capacity, mask)
        np.testing.assert_array_equal(to_numpy(chosen), ref_chosen)


class ExpertChoiceRouterTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("s8_e4_c2", 8, 4, 2, False),
        ("s16_e8_c4_pad", 16, 8, 4, True),
        ("s32_e4_c12_pad", 32, 4, 12, True),
    )
    def test_route_matches_reference(self, group_size, num_experts, capacity, pad):
        d, groups = 12, 2
        router, kernel = make_router(num_experts, d, seed=group_size)
        rng = np.random.default_rng(capacity)
        x = rng.normal(size=(groups, group_size, d)).astype(np.float32)
        mask = np.ones((groups, group_size), bool)
        if pad:
            mask[0, -group_size // 2 :] = False
            mask[1, ::3] = False
        routing = router.route(x, capacity=capacity, token_mask=mask, training=False)
        probs = np_softmax(x.astype(np.float64) @ kernel)
        ref_rank, ref_chosen, ref_weights = np_expert_choice(probs, capacity, mask)
        # Contract: k = E, choice j of every token is expert j.
        np.testing.assert_array_equal(
            to_numpy(routing.expert_index),
            np.broadcast_to(np.arange(num_experts), (groups, group_size, num_experts)),
        )
        np.testing.assert_array_equal(to_numpy(routing.dispatch_mask), ref_chosen)
        np.testing.assert_array_equal(to_numpy(routing.requested_mask), ref_chosen)
        np.testing.assert_array_equal(
            to_numpy(routing.position)[ref_chosen], ref_rank[ref_chosen]
        )
        np.testing.assert_allclose(
            to_numpy(routing.combine_weight), ref_weights, rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(
            to_numpy(routing.router_probs), probs, rtol=RTOL, atol=ATOL
        )
        self.assertEqual(routing.capacity, capacity)
        self.assertEqual(routing.num_experts, num_experts)
        self.assertFalse(to_numpy(routing.dispatch_mask)[~mask].any())
        # Slots of each expert in each group: exactly 0..n-1.
        position = to_numpy(routing.position)
        kept = to_numpy(routing.dispatch_mask)
        for g in range(groups):
            for e in range(num_experts):
                slots = np.sort(position[g, kept[g, :, e], e])
                np.testing.assert_array_equal(
                    slots, np.arange(min(capacity, int(mask[g].sum())))
                )

    def test_losses(self):
        d, group_size, num_experts = 8, 16, 4
        router, kernel = make_router(num_experts, d, seed=1, z_loss_weight=0.01)
        x = np.random.default_rng(2).normal(size=(2, group_size, d)).astype(np.float32)
        mask = np.ones((2, group_size), bool)
        mask[1, 10:] = False
        routing = router.route(x, capacity=4, token_mask=mask, training=False)
        # Only the z-loss: expert choice needs no balance loss.
        self.assertEqual(set(routing.aux_losses), {"z_loss"})
        logits = x.astype(np.float64) @ kernel
        log_z = np.log(np.exp(logits).sum(axis=-1))
        np.testing.assert_allclose(
            to_numpy(routing.aux_losses["z_loss"]),
            0.01 * np.mean(log_z[mask] ** 2),
            rtol=1e-4,
        )


if __name__ == "__main__":
    absltest.main()
