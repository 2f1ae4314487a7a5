"""Batched feed-forward experts: E FFNs applied to their dispatched buffers.

Weights: wi [E, d, h] (plus wi_gate [E, d, h] for gated activations), wo
[E, h, d], optional biases. Gated variants follow ST-MoE/T5.1.1:
act(x wi_gate) * (x wi).

Shape letters: E experts, G groups, C capacity, d model dim, h hidden dim.
"""

import keras
from keras import ops

from tf_moe._validation import check_choice, check_fraction, check_positive_int

PLAIN_ACTIVATIONS = {
    "relu": ops.relu,
    "gelu": ops.gelu,
    "silu": ops.silu,
}
GATED_ACTIVATIONS = {
    "reglu": ops.relu,
    "geglu": ops.gelu,
    "swiglu": ops.silu,
}
EXPERT_ACTIVATIONS = tuple(PLAIN_ACTIVATIONS) + tuple(GATED_ACTIVATIONS)


def _per_expert_fan_in(num_experts):
    # Keras computes fans of a [E, d, h] kernel as if E were a receptive field
    # (fan_in = E * d); scaling by E restores variance 1 / d per expert.
    return keras.initializers.VarianceScaling(
        scale=float(num_experts), mode="fan_in", distribution="truncated_normal"
    )


@keras.saving.register_keras_serializable(package="tf_moe")
class Experts(keras.layers.Layer):
    """E independent two-layer FFNs, evaluated as batched einsums.

    Args:
        num_experts: int >= 1, E.
        hidden_dim: int >= 1, h.
        activation: one of "relu", "gelu", "silu", "reglu", "geglu", "swiglu".
        use_bias: bool, default True.
        dropout: float in [0, 1), dropout on the hidden activations (training).
        kernel_initializer: initializer of the kernels, or None (default) for
            truncated normal with variance 1 / fan_in of each expert.
        bias_initializer: initializer of the biases, default "zeros".

    Call arguments:
        inputs: [E, G, C, d] dispatched tokens.
        training: bool.

    Output shape: [E, G, C, d].
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        activation="relu",
        use_bias=True,
        dropout=0.0,
        kernel_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("hidden_dim", hidden_dim)
        check_choice("activation", activation, EXPERT_ACTIVATIONS)
        check_fraction("dropout", dropout)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.use_bias = bool(use_bias)
        self.dropout = float(dropout)
        self.kernel_initializer = (
            None
            if kernel_initializer is None
            else keras.initializers.get(kernel_initializer)
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # Same dtype policy, or Dropout would cast bf16 hidden units to float32.
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    @property
    def gated(self):
        return self.activation in GATED_ACTIVATIONS

    def build(self, input_shape):
        d = input_shape[-1]
        e, h = self.num_experts, self.hidden_dim
        init = self.kernel_initializer or _per_expert_fan_in(e)
        self.wi = self.add_weight(name="wi", shape=(e, d, h), initializer=init)
        if self.gated:
            self.wi_gate = self.add_weight(
                name="wi_gate", shape=(e, d, h), initializer=init
            )
        self.wo = self.add_weight(name="wo", shape=(e, h, d), initializer=init)
        if self.use_bias:
            self.bi = self.add_weight(
                name="bi", shape=(e, 1, 1, h), initializer=self.bias_initializer
            )
            self.bo = self.add_weight(
                name="bo", shape=(e, 1, 1, d), initializer=self.bias_initializer
            )

    def call(self, inputs, training=None):
        hidden = ops.einsum("egcd,edh->egch", inputs, self.wi)  # [E, G, C, h]
        if self.use_bias:
            hidden = hidden + self.bi
        if self.gated:
            gate = ops.einsum("egcd,edh->egch", inputs, self.wi_gate)
            hidden = GATED_ACTIVATIONS[self.activation](gate) * hidden
        else:
            hidden = PLAIN_ACTIVATIONS[self.activation](hidden)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = ops.einsum("egch,ehd->egcd", hidden, self.wo)  # [E, G, C, d]
        if self.use_bias:
            outputs = outputs + self.bo
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "use_bias": self.use_bias,
                "dropout": self.dropout,
                "kernel_initializer": (
                    None
                    if self.kernel_initializer is None
                    else keras.initializers.serialize(self.kernel_initializer)
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config
