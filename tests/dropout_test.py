"""Tests for tf_moe.layers.dropout: inverted dropout (kept units scaled by
1 / (1 - rate), nothing changed at inference), with and without XLA, and the
layers that use it in the models.

Its reason, the XLA speed on TF CPU, is measured by
`benchmarks/xla_step.py --cases=dropout`, not here.
"""

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from keras import ops

from tf_moe.layers import dropout as dropout_lib

RATE = 0.25
SHAPE = (64, 256)


def jit(fn, jit_compile):
    """fn compiled as a train step would be on this backend (XLA or not)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile)
    import jax

    return jax.jit(fn) if jit_compile else fn


def check_inverted_dropout(test, x, y, rate):
    """Every unit is 0 or x / (1 - rate), and about `rate` of them are 0."""
    x, y = np.asarray(x), np.asarray(y)
    dropped = y == 0
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1 - rate), rtol=1e-6)
    # 16,384 units: the dropped fraction is within 5 standard deviations.
    sd = np.sqrt(rate * (1 - rate) / x.size)
    test.assertLess(abs(dropped.mean() - rate), 5 * sd)


class DropoutTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.default_rng(0).uniform(1.0, 2.0, SHAPE).astype("float32")  # no zeros

    @parameterized.parameters(False, True)
    def test_function_is_inverted_dropout(self, jit_compile):
        generator = keras.random.SeedGenerator(0)
        fn = jit(lambda x: dropout_lib.dropout(x, RATE, generator), jit_compile)
        first, second = ops.convert_to_numpy(fn(self.x)), ops.convert_to_numpy(fn(self.x))
        check_inverted_dropout(self, self.x, first, RATE)
        check_inverted_dropout(self, self.x, second, RATE)
        if keras.backend.backend() == "tensorflow" or not jit_compile:
            # The generator advances: two steps draw different masks. (Under
            # jax.jit its state is a traced constant; Keras's JAX trainer
            # threads it through the step itself.)
            self.assertFalse(np.array_equal(first == 0, second == 0))

    def test_int_and_tensor_seeds_repeat_their_mask(self):
        seed_dtype = "int32" if keras.backend.backend() == "tensorflow" else "uint32"
        for seed in (7, ops.convert_to_tensor([7, 1], seed_dtype)):
            a = ops.convert_to_numpy(dropout_lib.dropout(self.x, RATE, seed))
            b = ops.convert_to_numpy(dropout_lib.dropout(self.x, RATE, seed))
            check_inverted_dropout(self, self.x, a, RATE)
            np.testing.assert_array_equal(a, b)

    @parameterized.parameters(False, True)
    def test_layer_trains_and_infers(self, jit_compile):
        layer = dropout_lib.Dropout(RATE, seed=3)
        train = jit(lambda x: layer(x, training=True), jit_compile)
        check_inverted_dropout(self, self.x, ops.convert_to_numpy(train(self.x)), RATE)
        np.testing.assert_array_equal(ops.convert_to_numpy(layer(self.x, training=False)), self.x)

    def test_layer_with_noise_shape_shares_the_mask(self):
        layer = dropout_lib.Dropout(RATE, noise_shape=(1, SHAPE[1]), seed=3)
        y = ops.convert_to_numpy(layer(self.x, training=True))
        dropped = y == 0
        # One mask over the features, the same for every row.
        self.assertTrue((dropped == dropped[:1]).all())
        self.assertTrue(dropped.any())

    def test_layers_round_trip_through_their_config(self):
        layer = dropout_lib.Dropout(RATE, seed=3, name="d")
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        self.assertIsInstance(clone, dropout_lib.Dropout)
        self.assertEqual((clone.rate, clone.seed, clone.name), (RATE, 3, "d"))
        attention = dropout_lib.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.5, seed=1)
        clone = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(attention))
        self.assertIsInstance(clone, dropout_lib.MultiHeadAttention)
        self.assertEqual(clone.get_config(), attention.get_config())

    def test_attention_drops_its_probabilities_with_this_dropout(self):
        attention = dropout_lib.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.5, seed=1)
        x = self.x[None, :16, :32]  # [B, L, d]
        inference = ops.convert_to_numpy(attention(x, x, training=False))
        self.assertIsInstance(attention._dropout_layer, dropout_lib.Dropout)
        np.testing.assert_array_equal(ops.convert_to_numpy(attention(x, x, training=False)),
                                      inference)
        self.assertFalse(np.allclose(ops.convert_to_numpy(attention(x, x, training=True)),
                                     inference))


if __name__ == "__main__":
    absltest.main()
