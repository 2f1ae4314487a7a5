"""Transformers with Mixture-of-Experts feed-forward layers (Switch, GShard,
ST-MoE): a decoder-only language model and an encoder-decoder for translation.

Every block is pre-LayerNorm with residuals: x + Dropout(Attention(LN(x))),
[x + Dropout(CrossAttention(LN(x), memory))], x + Dropout(FFN(LN(x))). The FFN
of every `moe_every`-th block (blocks moe_every - 1, 2 * moe_every - 1, ...;
every other block by default, as in GShard and Switch) is a `tf_moe.layers.MoE`
with a `TopKRouter`; the others are dense. A final LayerNorm precedes the
output projection. Positions are learned or sinusoidal, added to the token
embeddings.

Owns: the blocks, the two model builders, attention masks.
Does not own: routing or expert math (`tf_moe.routing`, `tf_moe.layers`),
decoding (`tf_moe.models.decoding`).

Shape letters: B batch, L target (or LM) length, S source length, d model
dim, h hidden dim, V vocabulary.
"""

import keras
import numpy as np
from keras import ops

from tf_moe._validation import check_choice, check_fraction, check_positive_int
from tf_moe.layers import MoE
from tf_moe.layers.dropout import Dropout, MultiHeadAttention
from tf_moe.layers.experts import EXPERT_ACTIVATIONS, GATED_ACTIVATIONS, activate
from tf_moe.routing import TopKRouter

POSITION_KINDS = ("learned", "sinusoidal")


def sinusoidal_table(length, dim):
    """The fixed position table of Vaswani et al. 2017, section 3.5.

    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).

    Returns:
        <float32>[length, dim] numpy array.
    """
    position = np.arange(length, dtype=np.float64)[:, None]  # [L, 1]
    rate = 1.0 / np.power(10000.0, np.arange(0, dim, 2, dtype=np.float64) / dim)  # [d/2]
    table = np.zeros((length, dim), np.float64)
    table[:, 0::2] = np.sin(position * rate)
    table[:, 1::2] = np.cos(position * rate[: dim // 2])
    return table.astype(np.float32)


@keras.saving.register_keras_serializable(package="tf_moe")
class PositionEmbedding(keras.layers.Layer):
    """Adds learned or sinusoidal position embeddings to token embeddings.

    Args:
        max_length: int >= 1, the longest sequence supported.
        kind: "learned" (default; a trainable [max_length, d] table, normal
            init with stddev 0.02) or "sinusoidal" (fixed, `sinusoidal_table`).

    Call arguments:
        inputs: [B, L, d] with L <= max_length.

    Output shape: same as `inputs`.
    """

    def __init__(self, max_length, kind="learned", **kwargs):
        super().__init__(**kwargs)
        check_positive_int("max_length", max_length)
        check_choice("kind", kind, POSITION_KINDS)
        self.max_length = max_length
        self.kind = kind

    def build(self, input_shape):
        dim = input_shape[-1]
        if self.kind == "learned":
            self.table = self.add_weight(
                name="table",
                shape=(self.max_length, dim),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
            )
        else:
            self.table = ops.convert_to_tensor(sinusoidal_table(self.max_length, dim))

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        positions = ops.cast(self.table[:length], inputs.dtype)  # [L, d]
        return inputs + positions[None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length, "kind": self.kind}


@keras.saving.register_keras_serializable(package="tf_moe")
class FeedForward(keras.layers.Layer):
    """The dense position-wise FFN: Dense(h) -> activation -> Dropout -> Dense(d).

    Gated activations ("reglu", "geglu", "swiglu") compute
    act(x W_gate) * (x W_in), as the MoE experts do (T5.1.1, ST-MoE).

    Args:
        hidden_dim: int >= 1, h.
        activation: one of `tf_moe.layers.EXPERT_ACTIVATIONS`; default "relu".
        dropout: float in [0, 1), on the hidden units during training.

    Call arguments:
        inputs: [..., d].
        training: bool.

    Output shape: same as `inputs`.
    """

    def __init__(self, hidden_dim, activation="relu", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("hidden_dim", hidden_dim)
        check_choice("activation", activation, EXPERT_ACTIVATIONS)
        check_fraction("dropout", dropout)
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.dropout = dropout
        # Sub-layers follow this layer's dtype policy (e.g. mixed_bfloat16
        # given to the layer, not globally).
        self.wi = keras.layers.Dense(hidden_dim, name="wi", dtype=self.dtype_policy)
        self.wi_gate = (
            keras.layers.Dense(hidden_dim, name="wi_gate", dtype=self.dtype_policy)
            if activation in GATED_ACTIVATIONS
            else None
        )
        self.hidden_dropout = Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.wi.build(input_shape)
        if self.wi_gate is not None:
            self.wi_gate.build(input_shape)
        self.wo = keras.layers.Dense(dim, name="wo", dtype=self.dtype_policy)
        self.wo.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, inputs, training=None):
        gate = None if self.wi_gate is None else self.wi_gate(inputs)  # [..., h]
        hidden = activate(self.activation, self.wi(inputs), gate)  # [..., h]
        return self.wo(self.hidden_dropout(hidden, training=training))  # [..., d]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "activation": self.activation,
            "dropout": self.dropout,
        }


def is_moe_block(index, moe_every):
    """Whether block `index` (0-based) has an MoE FFN: every `moe_every`-th
    block, starting with block `moe_every - 1`."""
    return (index + 1) % moe_every == 0


def moe_from_config(model, name):
    """The MoE FFN of one block: `TopKRouter` + `MoE` from a model config.

    Switch is k=1; GShard k=2 with second_expert_policy="random" and
    normalize_weights=True; ST-MoE k=2 with z_loss_weight=1e-3 and
    expert_activation="geglu".
    """
    router = TopKRouter(
        k=model.k,
        second_expert_policy=model.second_expert_policy,
        normalize_weights=model.normalize_weights,
        batch_prioritized_routing=model.batch_prioritized_routing,
        balance_loss_weight=model.balance_loss_weight,
        z_loss_weight=model.z_loss_weight,
        jitter_noise=model.jitter_noise,
    )
    return MoE(
        num_experts=model.num_experts,
        expert_hidden_dim=model.expert_hidden_dim,
        expert_activation=model.expert_activation,
        expert_dropout=model.expert_dropout,
        router=router,
        capacity_factor=model.capacity_factor,
        eval_capacity_factor=model.eval_capacity_factor,
        group_size=model.group_size,
        dispatch=model.dispatch,
        name=name,
    )


def check_model_config(model):
    """Raises ValueError naming the `model.*` field that is invalid."""
    for field in ("dim", "num_heads", "num_layers", "ffn_hidden_dim", "moe_every",
                  "num_experts", "expert_hidden_dim"):
        check_positive_int(f"model.{field}", model[field])
    if model.dim % model.num_heads:
        raise ValueError(
            "`model.dim` must be divisible by `model.num_heads`. Received: "
            f"model.dim={model.dim}, model.num_heads={model.num_heads}"
        )
    check_choice("model.position", model.position, POSITION_KINDS)
    check_fraction("model.dropout", model.dropout)


def key_padding_mask(key_tokens, pad_id):
    """<bool>[B, 1, S]: true where key position s holds a real token
    (broadcast over queries by MultiHeadAttention)."""
    return ops.expand_dims(ops.not_equal(key_tokens, pad_id), 1)


def _embed(tokens, embedding, model, max_length, name):
    """Token embedding + positions + dropout: [B, L] -> [B, L, d]."""
    x = embedding(tokens)
    x = PositionEmbedding(max_length, model.position, name=f"{name}_position")(x)
    return Dropout(model.dropout, name=f"{name}_dropout")(x)


def _residual(x, sublayer_output, model, name):
    y = Dropout(model.dropout, name=f"{name}_dropout")(sublayer_output)
    return keras.layers.Add(name=f"{name}_residual")([x, y])


def _attention(model, name):
    return MultiHeadAttention(
        num_heads=model.num_heads,
        key_dim=model.dim // model.num_heads,
        dropout=model.dropout,
        name=name,
    )


def transformer_block(x, model, index, name, *, self_mask=None, causal=False,
                      memory=None, memory_mask=None):
    """One pre-LN block: self-attention, [cross-attention], FFN (MoE or dense).

    Args:
        x: [B, L, d].
        model: the model ConfigDict.
        index: block index in its stack (decides MoE vs dense FFN).
        name: layer-name prefix.
        self_mask: <bool>[B, 1, L] key padding mask for self-attention, or None.
        causal: mask future positions in self-attention.
        memory: [B, S, d] encoder output for cross-attention, or None.
        memory_mask: <bool>[B, 1, S] source padding mask, with `memory`.

    Returns:
        [B, L, d].
    """
    h = keras.layers.LayerNormalization(name=f"{name}_self_attention_norm")(x)
    h = _attention(model, f"{name}_self_attention")(
        h, h, attention_mask=self_mask, use_causal_mask=causal
    )
    x = _residual(x, h, model, f"{name}_self_attention")
    if memory is not None:
        h = keras.layers.LayerNormalization(name=f"{name}_cross_attention_norm")(x)
        h = _attention(model, f"{name}_cross_attention")(h, memory, attention_mask=memory_mask)
        x = _residual(x, h, model, f"{name}_cross_attention")
    h = keras.layers.LayerNormalization(name=f"{name}_ffn_norm")(x)
    if is_moe_block(index, model.moe_every):
        ffn = moe_from_config(model, f"{name}_moe")
    else:
        ffn = FeedForward(
            model.ffn_hidden_dim, model.ffn_activation, model.dropout, name=f"{name}_ffn"
        )
    return _residual(x, ffn(h), model, f"{name}_ffn")


def build_decoder_lm(vocab_size, seq_len, model):
    """Builds the (uncompiled) decoder-only language model.

    Args:
        vocab_size: int, V.
        seq_len: int, L (static, so routing groups are static).
        model: ConfigDict with `dim`, `num_heads`, `num_layers`,
            `ffn_hidden_dim`, `ffn_activation`, `dropout`, `position`,
            `moe_every` and the MoE fields read by `moe_from_config`.

    Returns:
        keras.Model: int tokens [B, L] -> logits [B, L, V]; position t sees
        tokens 0..t only.
    """
    check_model_config(model)
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    embedding = keras.layers.Embedding(vocab_size, model.dim, name="embedding")
    x = _embed(tokens, embedding, model, seq_len, "embedding")  # [B, L, d]
    for i in range(model.num_layers):
        x = transformer_block(x, model, i, f"decoder_{i}", causal=True)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)  # [B, L, V]
    return keras.Model(tokens, logits, name="transformer_moe_lm")


def build_encoder_decoder(vocab_size, max_length, model, pad_id=0):
    """Builds the (uncompiled) encoder-decoder translation model.

    The model is two nested functional models, `encoder` and `decoder`
    (`model.get_layer("encoder")`), so decoding can encode once and re-run
    only the decoder. Source and target share the vocabulary and the
    embedding table. Source positions equal to `pad_id` are masked out as
    keys of encoder self-attention and of cross-attention; decoder
    self-attention is causal (target padding only follows real tokens, so
    the causal mask already hides it from real positions).

    Args:
        vocab_size: int, V.
        max_length: int, S = L (static).
        model: ConfigDict as for `build_decoder_lm`; `num_layers` blocks in
            each of the encoder and the decoder.
        pad_id: int, the padding token id.

    Returns:
        keras.Model: {"source": int [B, S], "target_in": int [B, L]} ->
        logits [B, L, V]; position t sees target_in 0..t and the whole
        unpadded source.
    """
    check_model_config(model)
    embedding = keras.layers.Embedding(vocab_size, model.dim, name="embedding")

    source = keras.Input((max_length,), dtype="int32", name="source")
    source_mask = key_padding_mask(source, pad_id)  # [B, 1, S]
    x = _embed(source, embedding, model, max_length, "encoder_embedding")  # [B, S, d]
    for i in range(model.num_layers):
        x = transformer_block(x, model, i, f"encoder_{i}", self_mask=source_mask)
    memory = keras.layers.LayerNormalization(name="encoder_final_norm")(x)
    encoder = keras.Model(source, memory, name="encoder")

    memory_in = keras.Input((max_length, model.dim), name="memory")
    source_in = keras.Input((max_length,), dtype="int32", name="source_tokens")
    target = keras.Input((max_length,), dtype="int32", name="target_in")
    memory_mask = key_padding_mask(source_in, pad_id)  # [B, 1, S]
    y = _embed(target, embedding, model, max_length, "decoder_embedding")  # [B, L, d]
    for i in range(model.num_layers):
        y = transformer_block(
            y, model, i, f"decoder_{i}", causal=True, memory=memory_in, memory_mask=memory_mask
        )
    y = keras.layers.LayerNormalization(name="decoder_final_norm")(y)
    logits = keras.layers.Dense(vocab_size, name="logits")(y)  # [B, L, V]
    decoder = keras.Model([memory_in, source_in, target], logits, name="decoder")

    inputs = {
        "source": keras.Input((max_length,), dtype="int32", name="source"),
        "target_in": keras.Input((max_length,), dtype="int32", name="target_in"),
    }
    outputs = decoder([encoder(inputs["source"]), inputs["source"], inputs["target_in"]])
    return keras.Model(inputs, outputs, name="transformer_moe_translate")
