"""Softmax top-k token-choice routing: Switch (k=1), GShard (k=2), any k.

Each token picks the k experts of highest router probability. Choices are
placed into expert buffers rank by rank (all first choices, then second ...),
in token order or by descending top-1 probability (batch-prioritized routing,
Riquelme et al. 2021); choices past capacity are dropped. With k = E and no
capacity limit this is the dense softmax mixture of Deep MoE (Eigen et al.
2013).

Shape letters: G groups, S tokens per group, E experts, k choices.
"""

import keras
from keras import ops

from tf_moe._groups import top_k
from tf_moe._validation import check_choice, check_k, check_non_negative
from tf_moe.routing import losses
from tf_moe.routing.router import Router, Routing

SECOND_EXPERT_POLICIES = ("all", "random", "sampling")


def top_k_routing(
    router_probs,
    k,
    capacity,
    token_mask,
    keep_second=None,
    normalize_weights=False,
    batch_prioritized=False,
    balance_loss_weight=0.0,
):
    """Token-choice routing of router probabilities.

    Args:
        router_probs: <float32>[G, S, E] softmax of the router logits.
        k: int in [1, E].
        capacity: int, slots per expert per group (C).
        token_mask: <bool>[G, S] real tokens.
        keep_second: <bool>[G, S] or None; where false, the second choice is
            not requested (GShard's random second-expert policy; needs k = 2).
        normalize_weights: renormalize the k kept probabilities to sum to 1.
        batch_prioritized: order tokens by top-1 probability, not position,
            when filling capacity.
        balance_loss_weight: float >= 0, alpha of the Switch/GShard balance
            loss; 0 (default) leaves it out of `aux_losses`.

    Returns:
        A `Routing` (`Routing.from_choices`).
    """
    weights, expert_index = top_k(router_probs, k)  # [G, S, k]
    expert_index = ops.cast(expert_index, "int32")
    # Batch-prioritized routing orders by top-1 probability, before any
    # renormalization of the kept weights.
    priority = weights[..., 0] if batch_prioritized else None
    if normalize_weights:
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
    # Shape: [G, S, k]
    requested = ops.logical_and(
        token_mask[..., None], ops.ones_like(expert_index, dtype="bool")
    )
    if keep_second is not None:
        keep = ops.stack([ops.ones_like(keep_second), keep_second], axis=-1)
        requested = ops.logical_and(requested, keep)
    aux_losses = {}
    if balance_loss_weight > 0:
        aux_losses["balance_loss"] = balance_loss_weight * losses.balance_loss(
            router_probs, expert_index[..., 0], token_mask
        )
    return Routing.from_choices(
        expert_index, weights, requested, token_mask, router_probs, capacity,
        priority=priority, aux_losses=aux_losses,
    )


@keras.saving.register_keras_serializable(package="tf_moe")
class TopKRouter(Router):
    """Top-k softmax router (Switch for k=1, GShard for k=2).

    Args:
        k: int in [1, num_experts], experts per token. Default 2.
        num_experts: see `Router`.
        second_expert_policy: "all" (default) keeps every second choice;
            "random" (alias "sampling") keeps it during training with
            probability min(1, 2 * g2 / (g1 + g2)) (GShard, Algorithm 1). Only
            for k = 2; evaluation always uses "all".
        batch_prioritized_routing: bool, default False. Fill capacity in order
            of top-1 probability instead of token position (BPR, V-MoE).
        normalize_weights: bool, default False. Renormalize the k selected
            probabilities to sum to 1 (GShard top-2 does; Switch does not).
        balance_loss_weight: float >= 0, default 1e-2: alpha of the
            Switch/GShard balance loss alpha * E * sum_i f_i * P_i; 0 disables.
        **kwargs: `Router` arguments (jitter_noise, z_loss_weight,
            kernel_initializer (default truncated normal, fan-in scale 0.1 as
            in Switch), seed, name).

    Example:
    >>> router = TopKRouter(k=1, num_experts=4)
    >>> routing = router.route(keras.random.normal((2, 8, 16)), capacity=3)
    >>> tuple(routing.combine_weight.shape)
    (2, 8, 1)
    """

    def __init__(
        self,
        k=2,
        num_experts=None,
        second_expert_policy="all",
        batch_prioritized_routing=False,
        normalize_weights=False,
        balance_loss_weight=1e-2,
        kernel_initializer=None,
        **kwargs,
    ):
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.VarianceScaling(
                scale=0.1, mode="fan_in", distribution="truncated_normal"
            )
        super().__init__(
            num_experts=num_experts, kernel_initializer=kernel_initializer, **kwargs
        )
        check_k(k, num_experts)
        check_choice("second_expert_policy", second_expert_policy, SECOND_EXPERT_POLICIES)
        if second_expert_policy != "all" and k != 2:
            raise ValueError(
                "`second_expert_policy` other than 'all' needs k=2. Received: "
                f"second_expert_policy={second_expert_policy!r}, k={k}"
            )
        check_non_negative("balance_loss_weight", balance_loss_weight)
        self.k = k
        self.second_expert_policy = second_expert_policy
        self.batch_prioritized_routing = bool(batch_prioritized_routing)
        self.normalize_weights = bool(normalize_weights)
        self.balance_loss_weight = float(balance_loss_weight)

    @property
    def choices_per_token(self):
        return self.k

    def build(self, input_shape):
        super().build(input_shape)
        check_k(self.k, self.num_experts)

    def _route(self, x, logits, capacity, token_mask, training):
        router_probs = ops.softmax(logits, axis=-1)  # [G, S, E]
        keep_second = None
        if training and self.second_expert_policy != "all":
            top2, _ = top_k(router_probs, 2)  # [G, S, 2]
            draw = keras.random.uniform(
                ops.shape(token_mask), seed=self.seed_generator
            )  # [G, S]
            keep_second = draw < 2.0 * top2[..., 1] / ops.sum(top2, axis=-1)
        return top_k_routing(
            router_probs,
            self.k,
            capacity,
            token_mask,
            keep_second=keep_second,
            normalize_weights=self.normalize_weights,
            batch_prioritized=self.batch_prioritized_routing,
            balance_loss_weight=self.balance_loss_weight,
        )

    @property
    def loss_names(self):
        names = ("balance_loss",) if self.balance_loss_weight > 0 else ()
        return names + super().loss_names

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "second_expert_policy": self.second_expert_policy,
                "batch_prioritized_routing": self.batch_prioritized_routing,
                "normalize_weights": self.normalize_weights,
                "balance_loss_weight": self.balance_loss_weight,
            }
        )
        return config
