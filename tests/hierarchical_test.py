"""HierarchicalMoE against a per-token numpy reference of Shazeer 2017,
appendix B: y = sum_i G_primary(x)_i sum_j G_i(x)_j E_ij(x), and its losses."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import absltest, parameterized
from keras import ops

import tf_moe

A, B, D, H = 3, 4, 8, 16  # primary groups, experts per group, model dim, hidden


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _cv2(v):
    v = np.asarray(v, np.float64).ravel()
    return v.var() / (v.mean() ** 2 + 1e-10)


def _set_random_weights(layer, rng):
    for v in layer.weights:
        if v.trainable:
            v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))


def _reference(layer, x, k1, k2):
    """Per-token loop over the paper's formula, eval mode (no noise, no drops).

    Returns outputs [T, d] and the unweighted losses by name.
    """
    w1 = ops.convert_to_numpy(layer.primary_router.kernel)  # [a, ...] = [d, A]
    w2 = ops.convert_to_numpy(layer.secondary_router.kernel)  # [A, d, B]
    wi, wo = (ops.convert_to_numpy(v) for v in (layer.experts.wi, layer.experts.wo))
    bi, bo = (ops.convert_to_numpy(v) for v in (layer.experts.bi, layer.experts.bo))
    y = np.zeros_like(x)
    importance1 = np.zeros(A)
    load1 = np.zeros(A)
    importance_h = np.zeros((A, B))
    selected_h = np.zeros((A, B))
    group_count = np.zeros(A)
    for t, xt in enumerate(x):
        logits1 = xt @ w1
        top1 = np.argsort(-logits1)[:k1]
        gates1 = _softmax(logits1[top1])
        for i, g1 in zip(top1, gates1):
            importance1[i] += g1
            load1[i] += 1
            group_count[i] += 1
            logits2 = xt @ w2[i]
            top2 = np.argsort(-logits2)[:k2]
            gates2 = _softmax(logits2[top2])
            for j, g2 in zip(top2, gates2):
                e = i * B + j
                hidden = np.maximum(xt @ wi[e] + bi[e].ravel(), 0)
                y[t] += g1 * g2 * (hidden @ wo[e] + bo[e].ravel())
                importance_h[i, j] += g1 * g2
                selected_h[i, j] += 1
    load_h = load1[:, None] * selected_h / np.maximum(group_count, 1)[:, None]
    losses = {
        "importance_loss": _cv2(importance1),
        "load_loss": _cv2(load1),
        "hierarchical_importance_loss": _cv2(importance_h),
        "hierarchical_load_loss": _cv2(load_h),
    }
    # Share of the routed choices of each of the a * b experts.
    losses["expert_load"] = selected_h.ravel() / selected_h.sum()
    return y, losses


class HierarchicalMoETest(parameterized.TestCase):
    @parameterized.product(dispatch=["einsum", "gather"], ks=[(1, 1), (2, 2), (2, 1)])
    def test_matches_reference_without_drops(self, dispatch, ks):
        k1, k2 = ks
        rng = np.random.default_rng(0)
        layer = tf_moe.layers.HierarchicalMoE(
            A, B, H, primary_k=k1, secondary_k=k2, capacity_factor=None,
            eval_capacity_factor=None, group_size=16, dispatch=dispatch,
            importance_loss_weight=0.5, load_loss_weight=0.25,
        )
        x = rng.normal(size=(2, 20, D)).astype("float32")  # 40 tokens, 3 groups
        layer.build(x.shape)
        _set_random_weights(layer, rng)
        y = ops.convert_to_numpy(layer(x, training=False))
        expected, expected_losses = _reference(layer, x.reshape(-1, D), k1, k2)
        np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-4, atol=1e-4)
        stats = layer.last_routing_stats
        self.assertEqual(float(stats["dropped_fraction"]), 0.0)
        self.assertEqual(float(stats["secondary_dropped_fraction"]), 0.0)
        np.testing.assert_allclose(
            stats["expert_load"], expected_losses["expert_load"], rtol=1e-6, atol=1e-7
        )
        # Group padding (40 tokens in groups of 16) must not count in the losses:
        # only exact when one group holds every token, so route them as one.
        layer.group_size = 40
        layer(x, training=False)
        stats = layer.last_routing_stats
        for name, weight in [
            ("importance_loss", 0.5),
            ("hierarchical_importance_loss", 0.5),
            ("load_loss", 0.25),
            ("hierarchical_load_loss", 0.25),
        ]:
            np.testing.assert_allclose(
                stats[name], weight * expected_losses[name], rtol=1e-4, atol=1e-6,
                err_msg=name,
            )

    def test_einsum_and_gather_agree_with_drops(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(48, D)).astype("float32")
        outputs = []
        for dispatch in ["einsum", "gather"]:
            layer = tf_moe.layers.HierarchicalMoE(
                A, B, H, capacity_factor=0.5, eval_capacity_factor=0.5,
                min_capacity=1, group_size=16, dispatch=dispatch,
            )
            layer.build(x.shape)
            _set_random_weights(layer, np.random.default_rng(7))
            outputs.append(ops.convert_to_numpy(layer(x, training=False)))
            self.assertGreater(float(layer.last_routing_stats["dropped_fraction"]), 0)
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    def test_training_losses_have_gradient_wrt_noise_kernels(self):
        rng = np.random.default_rng(2)
        layer = tf_moe.layers.HierarchicalMoE(
            A, B, H, group_size=32, importance_loss_weight=0.0, seed=3
        )
        x = rng.normal(size=(32, D)).astype("float32")
        layer.build(x.shape)
        _set_random_weights(layer, rng)
        grads = _loss_gradients(layer, x)
        for name in ["primary_router/noise_kernel", "secondary_router/noise_kernel"]:
            self.assertGreater(np.abs(grads[name]).max(), 0.0, msg=name)

    def test_zero_initialized_gates_and_config_round_trip(self):
        layer = tf_moe.layers.HierarchicalMoE(
            2, 3, 8, primary_k=1, secondary_k=3, expert_activation="swiglu",
            expert_dropout=0.1, expert_use_bias=False, capacity_factor=1.5,
            eval_capacity_factor=None, min_capacity=2, group_size=64,
            dispatch="einsum", importance_loss_weight=0.2, load_loss_weight=0.0,
            noise_epsilon=0.05, seed=11, name="hmoe",
        )
        x = np.random.default_rng(3).normal(size=(4, 6, D)).astype("float32")
        layer(x)
        routers = (layer.primary_router, layer.secondary_router)
        for weight in [w for router in routers for w in router.weights]:
            self.assertEqual(np.abs(ops.convert_to_numpy(weight)).max(), 0, weight.path)
        self.assertEqual(tuple(layer.secondary_router.kernel.shape), (2, D, 3))
        config = layer.get_config()
        clone = tf_moe.layers.HierarchicalMoE.from_config(config)
        self.assertEqual(clone.get_config(), config)

    def test_keras_file_round_trip(self):
        rng = np.random.default_rng(4)
        inputs = keras.Input((6, D))
        model = keras.Model(
            inputs, tf_moe.layers.HierarchicalMoE(2, 2, H, group_size=12)(inputs)
        )
        _set_random_weights(model.layers[1], rng)
        x = rng.normal(size=(2, 6, D)).astype("float32")
        path = os.path.join(tempfile.mkdtemp(), "hmoe.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(model(x)), ops.convert_to_numpy(loaded(x))
        )

    @parameterized.parameters(
        dict(kwargs=dict(num_groups=0), name="num_groups"),
        dict(kwargs=dict(experts_per_group=0), name="experts_per_group"),
        dict(kwargs=dict(primary_k=4), name="primary_k"),
        dict(kwargs=dict(secondary_k=0), name="secondary_k"),
        dict(kwargs=dict(secondary_k=3), name="secondary_k"),
        dict(kwargs=dict(capacity_factor=0), name="capacity_factor"),
        dict(kwargs=dict(dispatch="scatter"), name="dispatch"),
        dict(kwargs=dict(expert_activation="tanh"), name="expert_activation"),
        dict(kwargs=dict(load_loss_weight=-1), name="load_loss_weight"),
        dict(kwargs=dict(group_size=0), name="group_size"),
    )
    def test_bad_configuration(self, kwargs, name):
        args = dict(num_groups=3, experts_per_group=2, expert_hidden_dim=4)
        args.update(kwargs)
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            tf_moe.layers.HierarchicalMoE(**args)

    def test_primary_k_is_checked_against_num_groups(self):
        # Not the primary router's own message about `k` and `num_experts`.
        with self.assertRaisesRegex(
            ValueError, r"`primary_k` must be at most `num_groups`.*primary_k=3, num_groups=2"
        ):
            tf_moe.layers.HierarchicalMoE(num_groups=2, experts_per_group=4,
                                          expert_hidden_dim=8, primary_k=3)


def _loss_gradients(layer, x):
    """Gradients of the layer's aux losses (training mode) by variable name."""
    trainable = layer.trainable_variables
    names = ["/".join(v.path.split("/")[-2:]) for v in trainable]
    if keras.backend.backend() == "jax":
        import jax

        def loss_fn(values):
            _, _, losses = _stateless(layer, values, x)
            return sum(losses)

        # One compiled program, not an eager compilation per op (JAX).
        grads = jax.jit(jax.grad(loss_fn))([v.value for v in trainable])
    else:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            layer(x, training=True)
            loss = tf.add_n(layer.losses)
        grads = tape.gradient(loss, trainable)
    return {n: np.zeros(v.shape) if g is None else ops.convert_to_numpy(g)
            for n, v, g in zip(names, trainable, grads)}


def _stateless(layer, trainable_values, x):
    non_trainable = [v.value for v in layer.non_trainable_variables]
    return layer.stateless_call(
        trainable_values, non_trainable, x, training=True, return_losses=True
    )


if __name__ == "__main__":
    absltest.main()
