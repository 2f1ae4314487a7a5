"""Auxiliary routing losses, as pure functions of router tensors.

Each function returns an unweighted float32 scalar; routers multiply by their
configured weight. Means and sums run over real tokens only (`token_mask`),
across all groups of the batch, and under TensorFlow's data parallelism over
every replica's tokens (`tf_moe._replicas.global_sum`), so the losses are
those of the global batch.

Shape letters: G groups, S tokens per group, E experts.
"""

from keras import ops

from tf_moe._replicas import global_sum


def _masked_mean(values, token_mask):
    """Mean of `values` [G, S, ...] over real tokens -> [...]."""
    mask = ops.cast(token_mask, values.dtype)  # [G, S]
    mask = ops.reshape(mask, ops.shape(mask) + (1,) * (len(values.shape) - 2))
    total = global_sum(ops.sum(values * mask, axis=(0, 1)))
    return total / ops.maximum(global_sum(ops.sum(mask, axis=(0, 1))), 1.0)


def cv_squared(values, epsilon=1e-10):
    """Squared coefficient of variation var(v) / mean(v)^2 of a vector [E].

    Shazeer et al. 2017, eqs. 6-7 (population variance). 0 for one expert.
    """
    if values.shape[-1] == 1:
        return ops.zeros((), dtype=values.dtype)
    mean = ops.mean(values)
    return ops.var(values) / (ops.square(mean) + epsilon)


def importance_loss(gates, token_mask):
    """CV(Importance(X))^2, Importance_i = sum_x G(x)_i (Shazeer 2017, eq. 6).

    Args:
        gates: <float32>[G, S, E] gate values, 0 for experts not kept.
        token_mask: <bool>[G, S].
    """
    gates = gates * ops.cast(token_mask, gates.dtype)[..., None]
    return cv_squared(global_sum(ops.sum(gates, axis=(0, 1))))


def load_loss(load_probs, token_mask):
    """CV(Load(X))^2, Load_i = sum_x P(x, i) (Shazeer 2017, eqs. 8-10).

    Args:
        load_probs: <float32>[G, S, E] P(x, i), the probability that expert i
            is selected for token x under fresh noise (or the 0/1 selection
            when there is no noise).
        token_mask: <bool>[G, S].
    """
    load_probs = load_probs * ops.cast(token_mask, load_probs.dtype)[..., None]
    return cv_squared(global_sum(ops.sum(load_probs, axis=(0, 1))))


def balance_loss(router_probs, first_expert, token_mask):
    """Switch/GShard load-balancing loss E * sum_i f_i * P_i (unweighted by alpha).

    f_i is the fraction of tokens whose first choice is expert i, P_i the mean
    router probability of expert i (Fedus et al. 2021, eq. 4).

    Args:
        router_probs: <float32>[G, S, E].
        first_expert: <int32>[G, S] each token's first choice.
        token_mask: <bool>[G, S].
    """
    num_experts = router_probs.shape[-1]
    f = _masked_mean(ops.one_hot(first_expert, num_experts), token_mask)  # [E]
    p = _masked_mean(router_probs, token_mask)  # [E]
    return num_experts * ops.sum(f * p)


def router_z_loss(logits, token_mask):
    """ST-MoE router z-loss: mean_x (log sum_j exp(logit_j(x)))^2 (Zoph 2022, eq. 5).

    Args:
        logits: <float32>[G, S, E] router logits.
        token_mask: <bool>[G, S].
    """
    log_z = ops.logsumexp(logits, axis=-1)  # [G, S]
    return _masked_mean(ops.square(log_z), token_mask)
