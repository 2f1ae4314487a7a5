"""Tests for tf_moe.routing.capacity (slot assignment) and `expert_capacity`.

References: C = ceil(capacity_factor * S * k / E) clipped to [min_capacity, S]
(DESIGN.md section 4; None => S), and a plain-Python loop that fills expert
buffers rank-major (all first choices, then all second choices, ...) in token
order, or in descending priority order within each rank.
"""

import math

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.routing import apply_capacity, assign_positions, expert_capacity


def py_expert_capacity(group_size, num_experts, capacity_factor, k=1, min_capacity=1):
    if capacity_factor is None:
        return group_size
    c = math.ceil(capacity_factor * group_size * k / num_experts)
    return min(group_size, max(min_capacity, c))


def py_assign_positions(expert_index, requested, num_experts, priority=None):
    """Plain loop: rank-major, then token order (or descending priority)."""
    groups, group_size, k = expert_index.shape
    position = np.full((groups, group_size, k), -1, np.int64)
    for g in range(groups):
        count = [0] * num_experts
        if priority is None:
            order = list(range(group_size))
        else:
            order = sorted(range(group_size), key=lambda s: -float(priority[g, s]))
        for r in range(k):
            for s in order:
                if requested[g, s, r]:
                    e = int(expert_index[g, s, r])
                    position[g, s, r] = count[e]
                    count[e] += 1
    return position


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def random_choices(rng, groups, group_size, k, num_experts, hole_rate):
    """Random [G, S, k] experts (distinct per token) and a requested mask."""
    scores = rng.random((groups, group_size, num_experts))
    expert_index = np.argsort(-scores, axis=-1)[..., :k].astype(np.int32)
    requested = rng.random((groups, group_size, k)) >= hole_rate
    return expert_index, requested


class ExpertCapacityTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("switch", 64, 8, 1.25, 1, 1),
        ("gshard", 64, 8, 1.25, 2, 1),
        ("exact", 32, 4, 1.0, 1, 1),
        ("fractional", 10, 3, 1.0, 1, 1),
        ("min_clip", 16, 8, 0.1, 1, 4),
        ("cap_at_group", 8, 2, 4.0, 2, 1),
        ("min_above_group", 4, 8, 1.0, 1, 6),
        ("k3", 24, 6, 1.5, 3, 2),
        ("tiny_factor", 64, 4, 0.01, 1, 1),
    )
    def test_matches_formula(self, group_size, num_experts, factor, k, min_capacity):
        got = expert_capacity(
            group_size,
            num_experts,
            factor,
            choices_per_token=k,
            min_capacity=min_capacity,
        )
        self.assertIsInstance(got, int)
        self.assertEqual(
            got, py_expert_capacity(group_size, num_experts, factor, k, min_capacity)
        )
        self.assertLessEqual(got, group_size)

    def test_specific_values(self):
        # ceil(1.25 * 64 * 2 / 8) = 20; ceil(1.0 * 10 / 3) = 4; min clip 4;
        # cap: ceil(4 * 8 * 2 / 2) = 32 -> 8.
        self.assertEqual(expert_capacity(64, 8, 1.25, choices_per_token=2), 20)
        self.assertEqual(expert_capacity(10, 3, 1.0), 4)
        self.assertEqual(expert_capacity(16, 8, 0.1, min_capacity=4), 4)
        self.assertEqual(expert_capacity(8, 2, 4.0, choices_per_token=2), 8)

    @parameterized.named_parameters(("s8", 8), ("s64", 64))
    def test_none_is_group_size(self, group_size):
        self.assertEqual(expert_capacity(group_size, 4, None), group_size)
        self.assertEqual(
            expert_capacity(group_size, 4, None, choices_per_token=3, min_capacity=2),
            group_size,
        )


class AssignPositionsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("k1_full", 2, 8, 1, 4, 0.0),
        ("k2_full", 3, 16, 2, 4, 0.0),
        ("k2_holes", 2, 32, 2, 8, 0.3),
        ("k3_holes", 3, 16, 3, 6, 0.25),
        ("k4_many_holes", 2, 64, 4, 8, 0.6),
    )
    def test_matches_loop_reference(self, groups, group_size, k, num_experts, holes):
        rng = np.random.default_rng(groups * 100 + group_size + k)
        expert_index, requested = random_choices(
            rng, groups, group_size, k, num_experts, holes
        )
        got = to_numpy(assign_positions(expert_index, requested, num_experts))
        expected = py_assign_positions(expert_index, requested, num_experts)
        self.assertEqual(got.shape, (groups, group_size, k))
        np.testing.assert_array_equal(got, expected)

    @parameterized.named_parameters(
        ("k1", 2, 16, 1, 4, 0.0),
        ("k2_holes", 3, 16, 2, 4, 0.3),
        ("k3_holes", 2, 32, 3, 8, 0.2),
    )
    def test_priority_matches_loop_reference(
        self, groups, group_size, k, num_experts, holes
    ):
        rng = np.random.default_rng(7 + k)
        expert_index, requested = random_choices(
            rng, groups, group_size, k, num_experts, holes
        )
        # Distinct priorities (no ties), in an order unrelated to token order.
        priority = rng.permutation(groups * group_size).reshape(groups, group_size)
        priority = (priority / (groups * group_size)).astype(np.float32)
        got = to_numpy(assign_positions(expert_index, requested, num_experts, priority))
        expected = py_assign_positions(expert_index, requested, num_experts, priority)
        np.testing.assert_array_equal(got, expected)
        # The priority order is not the token order for this draw, so the two
        # references differ: the test can tell them apart.
        self.assertFalse(
            np.array_equal(expected, py_assign_positions(expert_index, requested, num_experts))
        )

    def test_priority_ties_keep_token_order(self):
        # Equal priorities (e.g. identical tokens) fall back to token order.
        groups, group_size, k, num_experts = 2, 64, 2, 4
        rng = np.random.default_rng(5)
        expert_index, requested = random_choices(
            rng, groups, group_size, k, num_experts, 0.2
        )
        priority = rng.choice([0.25, 0.5, 0.75], size=(groups, group_size))
        priority = priority.astype(np.float32)
        got = to_numpy(assign_positions(expert_index, requested, num_experts, priority))
        expected = py_assign_positions(expert_index, requested, num_experts, priority)
        np.testing.assert_array_equal(got, expected)

    def test_rank_major_example(self):
        # One group, 3 tokens, k = 2, E = 2. First choices: e0, e0, e1;
        # second choices: e1, e1, e0. Rank-major order fills e0 with
        # (t0, r0), (t1, r0), (t2, r1) and e1 with (t2, r0), (t0, r1), (t1, r1).
        expert_index = np.array([[[0, 1], [0, 1], [1, 0]]], np.int32)
        requested = np.ones((1, 3, 2), bool)
        got = to_numpy(assign_positions(expert_index, requested, 2))
        np.testing.assert_array_equal(got, [[[0, 1], [1, 2], [0, 2]]])

    def test_priority_example(self):
        # Token 2 has the highest priority, then token 0, then token 1.
        expert_index = np.array([[[0], [0], [0]]], np.int32)
        requested = np.ones((1, 3, 1), bool)
        priority = np.array([[0.5, 0.1, 0.9]], np.float32)
        got = to_numpy(assign_positions(expert_index, requested, 1, priority))
        np.testing.assert_array_equal(got[..., 0], [[1, 2, 0]])

    @parameterized.named_parameters(
        ("no_priority", False, 0.0), ("priority", True, 0.0),
        ("holes", False, 0.4), ("holes_priority", True, 0.4),
    )
    def test_slot_invariants(self, use_priority, holes):
        groups, group_size, k, num_experts, capacity = 3, 32, 2, 4, 5
        rng = np.random.default_rng(11)
        expert_index, requested = random_choices(
            rng, groups, group_size, k, num_experts, holes
        )
        priority = None
        if use_priority:
            priority = rng.random((groups, group_size)).astype(np.float32)
        position = to_numpy(
            assign_positions(expert_index, requested, num_experts, priority)
        )
        kept = to_numpy(apply_capacity(position, requested, capacity))
        # Not requested: position -1, never kept.
        np.testing.assert_array_equal(position[~requested], -1)
        self.assertFalse(kept[~requested].any())
        np.testing.assert_array_equal(kept, requested & (position < capacity))
        saw_overflow = False
        for g in range(groups):
            for e in range(num_experts):
                sel = requested[g] & (expert_index[g] == e)
                n = int(sel.sum())
                # Requested slots of one expert: exactly 0..n-1, no repeats.
                np.testing.assert_array_equal(np.sort(position[g][sel]), np.arange(n))
                # Kept slots: exactly 0..min(n, C)-1, no repeats.
                kept_sel = kept[g] & (expert_index[g] == e)
                np.testing.assert_array_equal(
                    np.sort(position[g][kept_sel]), np.arange(min(n, capacity))
                )
                saw_overflow |= n > capacity
        self.assertTrue(saw_overflow)  # the draw exercises dropping

    def test_apply_capacity(self):
        position = np.array([[[0, 3], [1, -1], [4, 2]]], np.int32)
        requested = np.array([[[True, True], [True, False], [True, True]]])
        got = to_numpy(apply_capacity(position, requested, 3))
        np.testing.assert_array_equal(got, [[[True, False], [True, False], [False, True]]])


if __name__ == "__main__":
    absltest.main()
