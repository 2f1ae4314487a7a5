"""The LSTM-MoE language model of Shazeer et al. 2017 (appendix C.1).

embedding -> LSTM -> MoE -> LSTM -> softmax, every width d. For every layer but
the softmax, dropout is applied to the layer output and the layer input is
added back (residual). The MoE output passes through a sigmoid before dropout.
The MoE is flat (noisy top-k over E experts) or hierarchical (appendix B).
Under a mixed-precision policy the LSTMs compute in float32 (`_lstm`).

Shape letters: B batch, L length, d model dim, V vocabulary.
"""

import keras

from tf_moe._validation import check_fraction, check_positive_int
from tf_moe.layers import HierarchicalMoE, MoE
from tf_moe.layers.dropout import Dropout
from tf_moe.routing import NoisyTopKRouter


def check_model_config(model):
    """Raises ValueError naming the `model.*` field that is invalid (the
    layers check the MoE arguments under their own names)."""
    for field in ("dim", "expert_hidden_dim", "group_size"):
        check_positive_int(f"model.{field}", model[field])
    check_fraction("model.dropout", model.dropout)
    if model.get("dense_ffn_hidden_dim") is not None:
        check_positive_int("model.dense_ffn_hidden_dim", model.dense_ffn_hidden_dim)


def moe_layer_from_config(model, name="moe"):
    """The MoE layer a model config describes (flat or hierarchical)."""
    common = dict(
        expert_hidden_dim=model.expert_hidden_dim,
        expert_activation=model.get("expert_activation", "relu"),
        capacity_factor=model.capacity_factor,
        eval_capacity_factor=model.eval_capacity_factor,
        group_size=model.group_size,
        dispatch=model.get("dispatch", "auto"),
        name=name,
    )
    if model.get("hierarchical", False):
        return HierarchicalMoE(
            num_groups=model.num_groups,
            experts_per_group=model.experts_per_group,
            primary_k=model.primary_k,
            secondary_k=model.secondary_k,
            importance_loss_weight=model.importance_loss_weight,
            load_loss_weight=model.load_loss_weight,
            **common,
        )
    router = NoisyTopKRouter(
        k=model.k,
        importance_loss_weight=model.importance_loss_weight,
        load_loss_weight=model.load_loss_weight,
    )
    return MoE(num_experts=model.num_experts, router=router, **common)


def _lstm(units, name):
    """An LSTM that computes in float32 under a mixed-precision policy (its
    inputs are cast to float32, its outputs back by the next layer), while
    the embedding, MoE and softmax compute in the policy's dtype: cuDNN's RNN
    lowering on JAX GPUs rejects bfloat16 ("Unknown output type bfloat16",
    H200, jaxlib 0.11.2), and a recurrence over L steps is where reduced
    precision costs most."""
    return keras.layers.LSTM(units, return_sequences=True, dtype=_float32_if_mixed(), name=name)


def _float32_if_mixed():
    """"float32" under a mixed-precision global policy, else None (the policy)."""
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != policy.variable_dtype else None


def build_lstm_moe(vocab_size, sequence_length, model):
    """Builds the (uncompiled) LSTM-MoE language model.

    Args:
        vocab_size: int, V.
        sequence_length: int, L (static, so routing groups are static).
        model: ConfigDict with d (`dim`), `dropout`, `residual`,
            `moe_sigmoid`, and the MoE fields read by `moe_layer_from_config`;
            with `dense_ffn_hidden_dim` (an int), a dense ReLU FFN of that
            hidden width takes the MoE's place (the compute-matched baseline).

    Returns:
        keras.Model: int tokens [B, L] -> logits [B, L, V].
    """
    check_model_config(model)
    tokens = keras.Input((sequence_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, model.dim, name="embedding")(tokens)
    x = Dropout(model.dropout, name="embedding_dropout")(x)

    def sublayer(layer, x, name):
        y = Dropout(model.dropout, name=f"{name}_dropout")(layer(x))
        return keras.layers.Add(name=f"{name}_residual")([x, y]) if model.residual else y

    x = sublayer(_lstm(model.dim, "lstm_1"), x, "lstm_1")
    if model.get("dense_ffn_hidden_dim") is None:
        moe = moe_layer_from_config(model)
    else:
        # The dense baseline (the paper's "MoE-1-Wide"): one ReLU FFN that
        # every token runs; hidden k * expert_hidden_dim matches the MoE's
        # ops per timestep.
        moe = keras.Sequential([
            keras.layers.Dense(model.dense_ffn_hidden_dim, activation="relu", name="hidden"),
            keras.layers.Dense(model.dim, name="output"),
        ], name="dense_ffn")
    if model.moe_sigmoid:
        moe_block = lambda h: keras.layers.Activation("sigmoid", name="moe_sigmoid")(moe(h))
    else:
        moe_block = moe
    x = sublayer(moe_block, x, "moe")
    x = sublayer(_lstm(model.dim, "lstm_2"), x, "lstm_2")
    # float32 logits under a mixed policy: the loss and perplexity over V
    # classes in bfloat16 would round away most of the differences.
    logits = keras.layers.Dense(vocab_size, dtype=_float32_if_mixed(), name="softmax")(x)  # [B, L, V]
    return keras.Model(tokens, logits, name="lstm_moe")
