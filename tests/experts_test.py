"""Tests for tf_moe.layers.experts.Experts.

Reference, in numpy, per expert e (ST-MoE / T5.1.1 for the gated forms):
    plain:  y = act(x wi[e] + bi[e]) wo[e] + bo[e]
    gated:  y = (act(x wi_gate[e]) * (x wi[e] + bi[e])) wo[e] + bo[e]
with relu, gelu (Keras' default tanh approximation), silu = x sigmoid(x).
Dropout acts on the hidden units in training only (inverted: kept units are
scaled by 1 / (1 - rate)).

Shape letters: E experts, G groups, C capacity, d model dim, h hidden dim.
"""

import inspect

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.layers import EXPERT_ACTIVATIONS, Experts

E, G, C, D, H = 4, 2, 3, 8, 16


def to_numpy(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": np_gelu_tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}
GATED = {"reglu": "relu", "geglu": "gelu", "swiglu": "silu"}


def np_hidden(layer, x):
    """Hidden activations [E, G, C, h] before dropout."""
    hidden = np.einsum("egcd,edh->egch", x, to_numpy(layer.wi))
    if layer.use_bias:
        hidden = hidden + to_numpy(layer.bi)
    if layer.activation in GATED:
        gate = np.einsum("egcd,edh->egch", x, to_numpy(layer.wi_gate))
        return NP_ACTIVATIONS[GATED[layer.activation]](gate) * hidden
    return NP_ACTIVATIONS[layer.activation](hidden)


def np_experts(layer, x, hidden=None):
    hidden = np_hidden(layer, x) if hidden is None else hidden
    out = np.einsum("egch,ehd->egcd", hidden, to_numpy(layer.wo))
    if layer.use_bias:
        out = out + to_numpy(layer.bo)
    return out


def random_inputs(seed, shape=(E, G, C, D)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


class ExpertsTest(parameterized.TestCase):
    def test_activations_cover_plain_and_gated(self):
        self.assertCountEqual(
            EXPERT_ACTIVATIONS, list(NP_ACTIVATIONS) + list(GATED)
        )

    @parameterized.product(activation=EXPERT_ACTIVATIONS, use_bias=(True, False))
    def test_matches_numpy(self, activation, use_bias):
        layer = Experts(
            E,
            H,
            activation=activation,
            use_bias=use_bias,
            dropout=0.5,
            bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        )
        x = random_inputs(0)
        # Dropout is off at inference (training False or unset).
        y = to_numpy(layer(x, training=False))
        self.assertEqual(y.shape, (E, G, C, D))
        np.testing.assert_allclose(y, np_experts(layer, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            to_numpy(layer(x)), np_experts(layer, x), rtol=1e-5, atol=1e-5
        )
        names = sorted(w.path.split("/")[-1] for w in layer.weights)
        want = ["wi", "wo"] + (["wi_gate"] if activation in GATED else [])
        want += ["bi", "bo"] if use_bias else []
        self.assertEqual(names, sorted(want))
        self.assertEqual(tuple(layer.wi.shape), (E, D, H))
        self.assertEqual(tuple(layer.wo.shape), (E, H, D))

    def test_experts_are_independent(self):
        # Expert e's output depends only on its own buffer: changing expert
        # 1's inputs leaves every other expert's outputs unchanged.
        layer = Experts(E, H, activation="swiglu")
        x = random_inputs(1)
        y = to_numpy(layer(x))
        x2 = x.copy()
        x2[1] += 1.0
        y2 = to_numpy(layer(x2))
        np.testing.assert_array_equal(np.delete(y, 1, axis=0), np.delete(y2, 1, axis=0))
        self.assertGreater(np.abs(y[1] - y2[1]).max(), 1e-3)

    @parameterized.named_parameters(("relu", "relu"), ("swiglu", "swiglu"))
    def test_dropout_only_in_training(self, activation):
        rate = 0.5
        # With one hidden unit, each output row is either bo (unit dropped) or
        # bo + hidden / (1 - rate) * wo (unit kept).
        layer = Experts(
            E,
            1,
            activation=activation,
            dropout=rate,
            bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2),
        )
        x = random_inputs(2, (E, 4, 8, D))
        np.testing.assert_allclose(
            to_numpy(layer(x, training=False)), np_experts(layer, x), rtol=1e-5,
            atol=1e-5,
        )
        hidden = np_hidden(layer, x)  # [E, G, C, 1]
        dropped = np_experts(layer, x, np.zeros_like(hidden))
        kept = np_experts(layer, x, hidden / (1.0 - rate))
        y = to_numpy(layer(x, training=True))
        is_dropped = np.all(np.isclose(y, dropped, rtol=1e-5, atol=1e-5), axis=-1)
        is_kept = np.all(np.isclose(y, kept, rtol=1e-5, atol=1e-5), axis=-1)
        self.assertTrue(np.all(is_dropped | is_kept))
        # 128 units at rate 0.5: both outcomes occur (P(not) ~ 2^-127).
        self.assertTrue(np.any(is_dropped & ~is_kept))
        self.assertTrue(np.any(is_kept & ~is_dropped))

    def test_dropout_changes_training_output(self):
        layer = Experts(E, H, dropout=0.3)
        x = random_inputs(3)
        layer.build(x.shape)
        want = np_experts(layer, x)
        self.assertGreater(np.abs(to_numpy(layer(x, training=True)) - want).max(), 1e-3)
        no_dropout = Experts(E, H, dropout=0.0)
        no_dropout.build(x.shape)
        no_dropout.set_weights(layer.get_weights())
        np.testing.assert_allclose(
            to_numpy(no_dropout(x, training=True)), want, rtol=1e-5, atol=1e-5
        )

    def test_default_initializer_is_per_expert_fan_in(self):
        # Variance 1 / fan_in of one expert: 1 / d for wi, 1 / h for wo.
        layer = Experts(4, 64, activation="geglu")
        layer.build((4, 1, 1, 32))
        for weight, fan_in in ((layer.wi, 32), (layer.wi_gate, 32), (layer.wo, 64)):
            variance = to_numpy(weight).var()
            self.assertBetween(variance * fan_in, 0.85, 1.15)

    def test_get_config_round_trip(self):
        defaults = {
            name: p.default
            for name, p in inspect.signature(Experts.__init__).parameters.items()
            if name not in ("self", "kwargs")
        }
        values = dict(
            num_experts=3,
            hidden_dim=24,
            activation="geglu",
            use_bias=False,
            dropout=0.25,
            kernel_initializer=keras.initializers.RandomUniform(-0.2, 0.2, seed=4),
            bias_initializer=keras.initializers.Constant(0.5),
        )
        self.assertCountEqual(values, defaults)
        for name, value in values.items():
            self.assertNotEqual(value, defaults[name], name)
        layer = Experts(name="my_experts", **values)
        config = layer.get_config()
        for name in values:
            self.assertIn(name, config)
        restored = Experts.from_config(config)
        self.assertEqual(restored.get_config(), config)
        self.assertEqual(restored.name, "my_experts")
        self.assertEqual(restored.num_experts, 3)
        self.assertEqual(restored.hidden_dim, 24)
        self.assertEqual(restored.activation, "geglu")
        self.assertFalse(restored.use_bias)
        self.assertEqual(restored.dropout, 0.25)
        self.assertIsInstance(
            restored.kernel_initializer, keras.initializers.RandomUniform
        )
        self.assertEqual(restored.kernel_initializer.maxval, 0.2)
        self.assertEqual(restored.bias_initializer.value, 0.5)
        # Same weights -> same function.
        x = random_inputs(5, (3, G, C, D))
        layer.build(x.shape)
        restored.build(x.shape)
        restored.set_weights(layer.get_weights())
        np.testing.assert_allclose(
            to_numpy(restored(x)), to_numpy(layer(x)), rtol=1e-6, atol=1e-6
        )

    def test_default_config_round_trip(self):
        layer = Experts(E, H)
        restored = Experts.from_config(layer.get_config())
        self.assertEqual(restored.get_config(), layer.get_config())
        self.assertIsNone(restored.kernel_initializer)

    @parameterized.named_parameters(
        ("num_experts_0", dict(num_experts=0), "num_experts"),
        ("hidden_dim_0", dict(hidden_dim=0), "hidden_dim"),
        ("hidden_dim_float", dict(hidden_dim=2.5), "hidden_dim"),
        ("activation", dict(activation="tanh"), "activation"),
        ("dropout_1", dict(dropout=1.0), "dropout"),
        ("dropout_negative", dict(dropout=-0.1), "dropout"),
        ("dropout_1_5", dict(dropout=1.5), "dropout"),
    )
    def test_bad_arguments_raise(self, overrides, argument):
        kwargs = {"num_experts": E, "hidden_dim": H, **overrides}
        with self.assertRaisesRegex(ValueError, f"`{argument}`.*Received: {argument}="):
            Experts(**kwargs)

    def test_compute_output_shape(self):
        self.assertEqual(Experts(E, H).compute_output_shape((E, 2, 5, D)), (E, 2, 5, D))


class ExpertsDtypeTest(parameterized.TestCase):
    @parameterized.parameters(True, False)
    def test_bfloat16_policy_keeps_every_matmul_in_bfloat16(self, training):
        # A sub-layer without the parent's policy (the Dropout) once cast the
        # hidden units to float32, making the second matmul run in float32.
        layer = Experts(2, 8, dropout=0.5, dtype="bfloat16")
        hidden_dtypes = []
        original = layer.dropout_layer.call

        def spy(inputs, *args, **kwargs):
            outputs = original(inputs, *args, **kwargs)
            hidden_dtypes.append((str(inputs.dtype), str(outputs.dtype)))
            return outputs

        layer.dropout_layer.call = spy
        x = ops.ones((2, 1, 3, 4), "bfloat16")
        y = layer(x, training=training)
        self.assertIn("bfloat16", str(y.dtype))
        self.assertTrue(hidden_dtypes)
        for before, after in hidden_dtypes:
            self.assertIn("bfloat16", before)
            self.assertIn("bfloat16", after)


if __name__ == "__main__":
    absltest.main()
