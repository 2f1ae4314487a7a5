"""Feed-forward experts: E FFNs, and the one place their math is written.

Weights: wi [E, d, h] (plus wi_gate [E, d, h] for gated activations), wo
[E, h, d], optional biases bi [E, 1, 1, h], bo [E, 1, 1, d]. Gated variants
follow ST-MoE/T5.1.1: act(x wi_gate) * (x wi).

The same FFN runs on two layouts of the routed tokens: capacity buffers
[E, G, C, d] (batched einsums; `Experts.call`) and expert-sorted rows [N, d]
with segment sizes (grouped matmuls; `Experts.on_rows`, the dropless path).
`activate` is shared with the Transformer's dense FFN.

Owns: expert weights, the FFN math, activations. Does not own: moving tokens
(`tf_moe.ops`), routing.

Shape letters: E experts, G groups, C capacity, d model dim, h hidden dim,
N expert-sorted rows.
"""

import keras
from keras import ops

from tf_moe._validation import (
    check_choice,
    check_fraction,
    check_initializer,
    check_positive_int,
)
from tf_moe.layers.dropout import Dropout, dropout
from tf_moe.ops.grouped_matmul import (
    FUSED_ACTIVATIONS,
    grouped_matmul,
    grouped_matmul_bias,
    row_expert,
)

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


def activate(activation, hidden, gate=None):
    """An FFN's hidden activation: act(hidden), or act(gate) * hidden for the
    gated activations ("reglu", "geglu", "swiglu"; `gate` = x W_gate)."""
    if activation in GATED_ACTIVATIONS:
        return GATED_ACTIVATIONS[activation](gate) * hidden
    return PLAIN_ACTIVATIONS[activation](hidden)


def _buffer_matmul(x, kernel):
    """[E, n, a] @ [E, a, b] -> [E, n, b]."""
    return ops.einsum("ena,eab->enb", x, kernel)


def _buffer_bias(bias):
    """bias [E, 1, 1, b] -> [E, 1, b], for buffers flattened to [E, n, b]."""
    return ops.reshape(bias, (bias.shape[0], 1, bias.shape[-1]))


def _row_bias(bias, layout):
    """bias [E, 1, 1, b] -> [N, b], each row's expert bias (0 past the last
    segment).

    A one-hot matmul [N, E] @ [E, b] rather than a gather: its gradient is a
    matmul too (a gather's is a scatter-add of N rows into E, slow under
    contention on GPUs, and TF XLA aborts on the gradient of a gather from a
    concatenation)."""
    num_experts, b = bias.shape[0], bias.shape[-1]
    onehot = ops.one_hot(row_expert(layout), num_experts, dtype=bias.dtype)  # [N, E]
    return ops.matmul(onehot, ops.reshape(bias, (num_experts, b)))


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
        self.kernel_initializer = check_initializer("kernel_initializer", kernel_initializer)
        self.bias_initializer = check_initializer("bias_initializer", bias_initializer)
        # Same dtype policy, or Dropout would cast bf16 hidden units to float32.
        self.dropout_layer = Dropout(self.dropout, dtype=self.dtype_policy)

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

    @property
    def params(self):
        """dict name -> weight (wi, wo, [wi_gate], [bi, bo])."""
        names = ["wi", "wo"] + ["wi_gate"] * self.gated + ["bi", "bo"] * self.use_bias
        return {name: getattr(self, name) for name in names}

    def call(self, inputs, training=None):
        """Capacity buffers [E, G, C, d] -> [E, G, C, d]."""
        return self.on_buffers(inputs, training=training)

    def on_buffers(self, buffers, training=False, params=None, **kwargs):
        """Capacity buffers [E', G, C, d] -> [E', G, C, d], each expert's FFN
        on its buffer (E' = E, or a device's share of the experts with
        `params` its shard of the weights; `kwargs` as for `ffn`)."""
        # Shape: [E', G * C, d]. One row axis: XLA on CPU adds and reduces a
        # [E, 1, b] bias over it much faster than over (G, C).
        rows = ops.reshape(buffers, (buffers.shape[0], -1, buffers.shape[-1]))
        outputs = self.ffn(
            rows, params or self.params, _buffer_matmul, _buffer_bias, training, **kwargs
        )
        return ops.reshape(outputs, ops.shape(buffers))

    def on_rows(self, rows, layout, training=False, implementation="auto", params=None,
                **kwargs):
        """Expert-sorted rows [N, d] -> [N, d], the same FFNs by grouped matmuls.

        Args:
            rows: [N, d] sorted by expert in `layout`'s segments.
            layout: the rows' `tf_moe.ops.dropless.DroplessLayout`.
            training: bool (dropout).
            implementation: of `tf_moe.ops.grouped_matmul.grouped_matmul`.
            params: the weights to use (default `self.params`; a shard of them
                inside a per-device program).
            **kwargs: as for `ffn`.
        """
        def matmul(x, kernel):
            return grouped_matmul(x, kernel, layout, implementation)

        def matmul_bias(x, kernel, bias, activation):
            bias = ops.reshape(bias, (bias.shape[0], bias.shape[-1]))  # [E, b]
            return grouped_matmul_bias(x, kernel, bias, layout, activation, implementation)

        return self.ffn(
            rows, params or self.params, matmul, lambda b: _row_bias(b, layout), training,
            matmul_bias=matmul_bias, **kwargs,
        )

    def ffn(self, x, params, matmul, broadcast_bias, training, partial_sum=None,
            dropout_seed=None, matmul_bias=None):
        """The expert FFN on any layout of routed tokens.

        Args:
            x: routed tokens, [..., d] in the layout `matmul` expects.
            params: dict of weights as in `self.params` (cast to the compute
                dtype here).
            matmul: fn(x [..., a], kernel [E, a, b]) -> [..., b], each token
                with its expert's kernel.
            broadcast_bias: fn(bias [E, 1, 1, b]) -> the bias broadcast to x's layout.
            training: bool.
            partial_sum: fn applied to the output matmul before its bias, or
                None: with the hidden dim sharded (`params` a shard of it) it
                sums the devices' partial products.
            dropout_seed: a seed for `layers.dropout.dropout`, or None for the
                layer's own seed generator (a per-device program passes one).
            matmul_bias: None, or fn(x, kernel, bias [E, 1, 1, b], activation)
                -> act(matmul(x, kernel) + bias) in one op (activation None or
                one of `FUSED_ACTIVATIONS`), used for the biased matmuls.
        """
        dtype = self.compute_dtype
        w = {name: ops.cast(value, dtype) for name, value in params.items()}
        x = ops.cast(x, dtype)
        fuse = self.use_bias and matmul_bias is not None
        fused_activation = (
            self.activation if fuse and self.activation in FUSED_ACTIVATIONS else None
        )
        if fuse:
            hidden = matmul_bias(x, w["wi"], w["bi"], fused_activation)  # [..., h]
        else:
            hidden = matmul(x, w["wi"])  # [..., h]
            if self.use_bias:
                hidden = hidden + broadcast_bias(w["bi"])
        gate = matmul(x, w["wi_gate"]) if self.gated else None
        if fused_activation is None:
            hidden = activate(self.activation, hidden, gate)
        if dropout_seed is None:
            hidden = self.dropout_layer(hidden, training=training)
        elif training and self.dropout > 0:
            hidden = dropout(hidden, self.dropout, seed=dropout_seed)
        if fuse and partial_sum is None:
            return matmul_bias(hidden, w["wo"], w["bo"], None)  # [..., d]
        outputs = matmul(hidden, w["wo"])  # [..., d]
        if partial_sum is not None:
            outputs = partial_sum(outputs)
        if self.use_bias:
            outputs = outputs + broadcast_bias(w["bo"])
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
