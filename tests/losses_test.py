"""Tests for tf_moe.routing.losses against numpy forms of the paper formulas.

References (DESIGN.md section 4):
  CV(v)^2 = var(v) / mean(v)^2 (population variance; Shazeer et al. 2017).
  importance loss = CV(sum_x G(x))^2, load loss = CV(sum_x P(x, i))^2.
  balance loss = E * sum_i f_i * P_i (Fedus et al. 2021; alpha applied by the
    router), f_i = fraction of tokens whose first choice is i, P_i = mean prob.
  z-loss = mean_x (log sum_j exp(logit_j(x)))^2 (Zoph et al. 2022).
Means and sums run over real tokens only; padding must not change any loss.
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.routing import losses

RTOL = 1e-5


def np_cv_squared(values):
    values = np.asarray(values, np.float64)
    return values.var() / values.mean() ** 2


def np_importance_loss(gates_real):
    """gates_real: [N, E] gates of the real tokens only."""
    return np_cv_squared(gates_real.sum(axis=0))


def np_balance_loss(probs_real, first_real):
    """probs_real: [N, E]; first_real: [N] first choices of the real tokens."""
    num_tokens, num_experts = probs_real.shape
    f = np.bincount(first_real, minlength=num_experts) / num_tokens
    p = probs_real.mean(axis=0)
    return num_experts * np.sum(f * p)


def np_z_loss(logits_real):
    """logits_real: [N, E]."""
    logits_real = np.asarray(logits_real, np.float64)
    top = logits_real.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits_real - top).sum(axis=-1)) + top[:, 0]
    return np.mean(log_z**2)


def np_softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def random_mask(rng, groups, group_size):
    """<bool>[G, S] with padding in every group but at least one real token."""
    mask = rng.random((groups, group_size)) < 0.7
    mask[:, 0] = True
    mask[:, -1] = False
    return mask


def sparse_gates(rng, shape, k):
    """Random top-k gates [G, S, E]: k nonzero entries per token summing to 1."""
    logits = rng.normal(size=shape)
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    masked = np.where(logits >= kth, logits, -np.inf)
    return np_softmax(masked).astype(np.float32)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


class CvSquaredTest(parameterized.TestCase):
    @parameterized.named_parameters(("e4", 4), ("e8", 8), ("e2", 2))
    def test_matches_numpy(self, num_experts):
        rng = np.random.default_rng(num_experts)
        values = rng.uniform(0.1, 5.0, size=(num_experts,)).astype(np.float32)
        got = to_numpy(losses.cv_squared(ops.convert_to_tensor(values)))
        self.assertEqual(got.dtype, np.float32)
        self.assertEqual(got.shape, ())
        np.testing.assert_allclose(got, np_cv_squared(values), rtol=RTOL)

    def test_uniform_is_zero(self):
        got = to_numpy(losses.cv_squared(ops.full((6,), 3.5)))
        np.testing.assert_allclose(got, 0.0, atol=1e-12)

    def test_one_expert_is_zero(self):
        got = to_numpy(losses.cv_squared(ops.convert_to_tensor([7.0])))
        self.assertEqual(got.shape, ())
        self.assertEqual(float(got), 0.0)

    def test_scale_invariant(self):
        rng = np.random.default_rng(0)
        values = rng.uniform(0.1, 5.0, size=(5,)).astype(np.float32)
        a = to_numpy(losses.cv_squared(ops.convert_to_tensor(values)))
        b = to_numpy(losses.cv_squared(ops.convert_to_tensor(values * 100.0)))
        np.testing.assert_allclose(a, b, rtol=RTOL)


class TokenLossesTest(parameterized.TestCase):
    """importance_loss, load_loss, balance_loss, router_z_loss."""

    def _inputs(self, seed, groups, group_size, num_experts):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, groups, group_size)
        logits = rng.normal(scale=2.0, size=(groups, group_size, num_experts))
        logits = logits.astype(np.float32)
        # Garbage at padding positions: it must not leak into any loss.
        logits[~mask] = 1e3 * rng.normal(size=(int((~mask).sum()), num_experts))
        return rng, mask, logits

    @parameterized.named_parameters(
        ("g2_s8_e4_k1", 2, 8, 4, 1),
        ("g3_s16_e8_k2", 3, 16, 8, 2),
        ("g2_s32_e6_k3", 2, 32, 6, 3),
    )
    def test_importance_loss(self, groups, group_size, num_experts, k):
        rng, mask, _ = self._inputs(1, groups, group_size, num_experts)
        gates = sparse_gates(rng, (groups, group_size, num_experts), k)
        gates[~mask] = 50.0
        got = to_numpy(losses.importance_loss(gates, mask))
        np.testing.assert_allclose(got, np_importance_loss(gates[mask]), rtol=RTOL)

    @parameterized.named_parameters(
        ("g2_s8_e4", 2, 8, 4), ("g3_s16_e8", 3, 16, 8), ("g2_s64_e5", 2, 64, 5)
    )
    def test_load_loss(self, groups, group_size, num_experts):
        rng, mask, _ = self._inputs(2, groups, group_size, num_experts)
        load_probs = rng.uniform(size=(groups, group_size, num_experts))
        load_probs = load_probs.astype(np.float32)
        load_probs[~mask] = 9.0
        got = to_numpy(losses.load_loss(load_probs, mask))
        # Load_i = sum over real tokens of P(x, i).
        expected = np_cv_squared(load_probs[mask].sum(axis=0))
        np.testing.assert_allclose(got, expected, rtol=RTOL)

    @parameterized.named_parameters(
        ("g2_s8_e4", 2, 8, 4), ("g3_s16_e8", 3, 16, 8), ("g2_s64_e6", 2, 64, 6)
    )
    def test_balance_loss(self, groups, group_size, num_experts):
        _, mask, logits = self._inputs(3, groups, group_size, num_experts)
        probs = np_softmax(logits).astype(np.float32)
        first = np.argmax(probs, axis=-1).astype(np.int32)
        got = to_numpy(losses.balance_loss(probs, first, mask))
        expected = np_balance_loss(probs[mask], first[mask])
        np.testing.assert_allclose(got, expected, rtol=RTOL)

    def test_balance_loss_uniform_is_one(self):
        # Perfect balance: f_i = P_i = 1/E, so E * sum_i f_i P_i = 1.
        num_experts, group_size = 4, 8
        probs = np.full((2, group_size, num_experts), 1.0 / num_experts, np.float32)
        first = np.tile(np.arange(group_size) % num_experts, (2, 1)).astype(np.int32)
        mask = np.ones((2, group_size), bool)
        got = to_numpy(losses.balance_loss(probs, first, mask))
        np.testing.assert_allclose(got, 1.0, rtol=RTOL)

    @parameterized.named_parameters(
        ("g2_s8_e4", 2, 8, 4), ("g3_s16_e8", 3, 16, 8), ("g2_s64_e6", 2, 64, 6)
    )
    def test_router_z_loss(self, groups, group_size, num_experts):
        _, mask, logits = self._inputs(4, groups, group_size, num_experts)
        got = to_numpy(losses.router_z_loss(logits, mask))
        np.testing.assert_allclose(got, np_z_loss(logits[mask]), rtol=RTOL)

    def test_padding_equals_dropping_tokens(self):
        """Each loss on [G, S] with padding equals the loss on the real tokens
        alone, laid out as a single unpadded group."""
        groups, group_size, num_experts = 3, 16, 6
        rng, mask, logits = self._inputs(5, groups, group_size, num_experts)
        gates = sparse_gates(rng, logits.shape, 2)
        gates[~mask] = 3.0
        load_probs = rng.uniform(size=logits.shape).astype(np.float32)
        probs = np_softmax(logits).astype(np.float32)
        first = np.argmax(probs, axis=-1).astype(np.int32)
        num_real = int(mask.sum())
        self.assertLess(num_real, groups * group_size)
        dense_mask = np.ones((1, num_real), bool)

        def real(a):
            return a[mask][None]  # [1, N, ...]

        pairs = [
            (
                losses.importance_loss(gates, mask),
                losses.importance_loss(real(gates), dense_mask),
            ),
            (
                losses.load_loss(load_probs, mask),
                losses.load_loss(real(load_probs), dense_mask),
            ),
            (
                losses.balance_loss(probs, first, mask),
                losses.balance_loss(real(probs), real(first), dense_mask),
            ),
            (
                losses.router_z_loss(logits, mask),
                losses.router_z_loss(real(logits), dense_mask),
            ),
        ]
        for padded, dropped in pairs:
            np.testing.assert_allclose(to_numpy(padded), to_numpy(dropped), rtol=RTOL)

    def test_padding_values_change_nothing(self):
        groups, group_size, num_experts = 2, 16, 4
        rng, mask, logits = self._inputs(6, groups, group_size, num_experts)
        other = logits.copy()
        other[~mask] = rng.normal(size=(int((~mask).sum()), num_experts))
        first = np.argmax(logits, axis=-1).astype(np.int32)
        other_first = first.copy()
        other_first[~mask] = (first[~mask] + 1) % num_experts
        probs = np_softmax(logits).astype(np.float32)
        other_probs = np_softmax(other).astype(np.float32)
        cases = [
            (losses.router_z_loss, (logits, mask), (other, mask)),
            (losses.balance_loss, (probs, first, mask), (other_probs, other_first, mask)),
            (losses.importance_loss, (probs, mask), (other_probs, mask)),
            (losses.load_loss, (probs, mask), (other_probs, mask)),
        ]
        for fn, a, b in cases:
            np.testing.assert_allclose(
                to_numpy(fn(*a)), to_numpy(fn(*b)), rtol=RTOL, err_msg=fn.__name__
            )

    def test_unmasked_tokens_do_count(self):
        # Sanity of the mask direction: changing a real token changes the loss.
        groups, group_size, num_experts = 2, 8, 4
        _, mask, logits = self._inputs(7, groups, group_size, num_experts)
        changed = logits.copy()
        changed[0, 0] += 5.0  # token (0, 0) is always real
        a = to_numpy(losses.router_z_loss(logits, mask))
        b = to_numpy(losses.router_z_loss(changed, mask))
        self.assertGreater(abs(float(a) - float(b)), 1e-3)
        np.testing.assert_allclose(b, np_z_loss(changed[mask]), rtol=RTOL)


if __name__ == "__main__":
    absltest.main()
