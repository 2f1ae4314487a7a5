"""Dropout that compiles well under XLA on TensorFlow.

Keras's TensorFlow backend draws dropout masks with TensorFlow's stateless
RNG on its default algorithm, "auto_select". Under XLA on CPU, with a seed
XLA cannot fold (a SeedGenerator's state, as in every train step), that
expansion is 40-100x slower than without XLA (a [8, 640, 512] mask:
1.9-2.7 s against 26-29 ms, `benchmarks/xla_step.py --cases=dropout`), and
it was most of the tiny Transformer-MoE step. Naming "philox" compiles to
about 50 ms. No library option selects the algorithm, so this module does, in
one place; on other backends it is `keras.random.dropout` unchanged.
"""

import keras


def dropout(inputs, rate, seed):
    """`keras.random.dropout(inputs, rate, seed=seed)`, with TensorFlow's
    Philox algorithm named on the TensorFlow backend.

    Args:
        inputs: a tensor.
        rate: the fraction of units dropped, in [0, 1).
        seed: a `keras.random.SeedGenerator`, an int, or a seed tensor [2].
    """
    if keras.backend.backend() != "tensorflow":
        return keras.random.dropout(inputs, rate, seed=seed)
    import tensorflow as tf  # the TensorFlow backend is loaded already

    if isinstance(seed, keras.random.SeedGenerator):
        seed = seed.next()
    elif isinstance(seed, int):
        seed = [seed, 0]
    seed = tf.cast(seed, "int32")  # [2]
    return tf.nn.experimental.stateless_dropout(inputs, rate, seed=seed, rng_alg="philox")


@keras.saving.register_keras_serializable(package="tf_moe")
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` drawing its masks through `dropout` above (the
    same arguments, the same saved config)."""

    def call(self, inputs, training=False):
        if not training or self.rate == 0 or self.noise_shape is not None:
            return super().call(inputs, training=training)
        return dropout(inputs, self.rate, self.seed_generator)


@keras.saving.register_keras_serializable(package="tf_moe")
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose attention-probability dropout
    is `Dropout` above. Keras builds that layer inside `_build_attention`
    (no argument selects it), so it is replaced there."""

    def _build_attention(self, rank):
        super()._build_attention(rank)
        self._dropout_layer = Dropout(rate=self._dropout, dtype=self.dtype_policy, seed=self.seed)
