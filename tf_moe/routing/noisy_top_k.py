"""Noisily gated top-k routing (Shazeer et al. 2017, "Outrageously Large Neural
Networks", section 2.1 and appendix A).

H(x)_i = (x W_g)_i + eps_i * softplus((x W_noise)_i), eps ~ N(0, 1) in training;
G(x) = softmax(KeepTopK(H(x), k)). Balancing: importance loss CV(sum_x G(x))^2
and the smooth load loss CV(sum_x P(x, i))^2.

Shape letters: G groups, S tokens per group, d model dim, E experts, k choices.
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from tf_moe._groups import top_k
from tf_moe._validation import check_k, check_non_negative
from tf_moe.routing import losses
from tf_moe.routing.router import Router, Routing


class NoisyGates(NamedTuple):
    """The noisy top-k gates of a batch of groups.

    Attributes:
        expert_index: <int32>[G, S, k] the k experts of each token.
        gates: <float32>[G, S, k] their gate values (softmax of the kept
            noisy logits).
        dense_gates: <float32>[G, S, E] G(x): the gates scattered over all
            experts, 0 for experts not kept (input of the importance loss).
        load_probs: <float32>[G, S, E] P(x, i) (input of the load loss).
    """

    expert_index: object
    gates: object
    dense_gates: object
    load_probs: object


def _normal_cdf(x):
    return 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def noisy_top_k_gates(clean_logits, noise_stddev, noise, k):
    """Top-k gates and the load estimator P(x, i).

    Args:
        clean_logits: <float32>[G, S, E] x W_g.
        noise_stddev: <float32>[G, S, E] softplus(x W_noise) (+ epsilon), or None.
        noise: <float32>[G, S, E] standard normal draws, or None for no noise.
        k: int in [1, E].

    Returns:
        `NoisyGates`. With noise, load_probs is P(x, i) = Phi((clean_i -
        kth_excluding(H, k, i)) / stddev_i), which is differentiable in W_g and
        W_noise; without noise, it is the 0/1 indicator of selection
        (Shazeer 2017, appendix A).
    """
    num_experts = clean_logits.shape[-1]
    noisy = clean_logits if noise is None else clean_logits + noise * noise_stddev
    # Shape: [G, S, min(k + 1, E)]; the (k+1)-th value is the threshold for
    # experts already in the top k.
    top_values, top_index = top_k(noisy, min(k + 1, num_experts))
    expert_index = ops.cast(top_index[..., :k], "int32")  # [G, S, k]
    # Shape: [G, S, k]; softmax over one value is 1 (said without a warning).
    if k == 1:
        gates = ops.ones_like(top_values[..., :1])
    else:
        gates = ops.softmax(top_values[..., :k], axis=-1)
    # Shape: [G, S, E]
    onehot = ops.one_hot(expert_index, num_experts)  # [G, S, k, E]
    dense_gates = ops.einsum("gske,gsk->gse", onehot, gates)
    selected = ops.sum(onehot, axis=2)  # [G, S, E]
    if noise is None or k >= num_experts:
        return NoisyGates(expert_index, gates, dense_gates, selected)
    threshold_if_in = top_values[..., k : k + 1]  # [G, S, 1]
    threshold_if_out = top_values[..., k - 1 : k]  # [G, S, 1]
    is_in = noisy > threshold_if_in  # [G, S, E]
    threshold = ops.where(is_in, threshold_if_in, threshold_if_out)
    load_probs = _normal_cdf((clean_logits - threshold) / noise_stddev)
    return NoisyGates(expert_index, gates, dense_gates, load_probs)


def noisy_top_k_routing(clean_logits, gates, capacity, token_mask,
                        importance_loss_weight=0.0, load_loss_weight=0.0):
    """Noisy top-k gates placed into expert buffers of `capacity` slots.

    Args:
        clean_logits: <float32>[G, S, E] x W_g.
        gates: the `NoisyGates` of `clean_logits` (`noisy_top_k_gates`).
        capacity: int, C.
        token_mask: <bool>[G, S] real tokens.
        importance_loss_weight, load_loss_weight: floats >= 0; a loss with
            weight 0 (default) is left out of `aux_losses`.

    Returns:
        A `Routing` (`Routing.from_choices`, token order within each rank).
    """
    # Shape: [G, S, k]
    requested = ops.logical_and(
        token_mask[..., None], ops.ones_like(gates.expert_index, dtype="bool")
    )
    aux_losses = {}
    if importance_loss_weight > 0:
        aux_losses["importance_loss"] = importance_loss_weight * (
            losses.importance_loss(gates.dense_gates, token_mask)
        )
    if load_loss_weight > 0:
        aux_losses["load_loss"] = load_loss_weight * losses.load_loss(
            gates.load_probs, token_mask
        )
    return Routing.from_choices(
        gates.expert_index, gates.gates, requested, token_mask,
        ops.softmax(clean_logits, axis=-1), capacity, aux_losses=aux_losses,
    )


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKRouter(Router):
    """Shazeer et al. 2017 noisy top-k gating, with importance and load losses.

    W_g and W_noise start at zero (paper, appendix A), so routing starts
    uniform and the noise (softplus(0) = 0.69) breaks ties. Noise applies only
    in training. The kept top-k logits are renormalized by a softmax.

    Args:
        k: int in [1, num_experts], experts per token. Default 4.
        num_experts: see `Router`.
        importance_loss_weight: float >= 0, default 0.1 (paper's w_importance).
        load_loss_weight: float >= 0, default 0.1 (paper's w_load).
        noise_epsilon: float >= 0, default 1e-2, added to the noise stddev so it
            never reaches 0 (keeps P(x, i) finite).
        **kwargs: `Router` arguments (jitter_noise, z_loss_weight (default 0
            here: the 2017 paper has none), kernel_initializer, seed, name).

    Example:
    >>> router = NoisyTopKRouter(k=2, num_experts=4)
    >>> routing = router.route(keras.ops.ones((1, 8, 16)), capacity=8)
    >>> tuple(routing.expert_index.shape)
    (1, 8, 2)
    """

    def __init__(
        self,
        k=4,
        num_experts=None,
        importance_loss_weight=0.1,
        load_loss_weight=0.1,
        noise_epsilon=1e-2,
        z_loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(num_experts=num_experts, z_loss_weight=z_loss_weight, **kwargs)
        check_k(k, num_experts)
        check_non_negative("importance_loss_weight", importance_loss_weight)
        check_non_negative("load_loss_weight", load_loss_weight)
        check_non_negative("noise_epsilon", noise_epsilon)
        self.k = k
        self.importance_loss_weight = float(importance_loss_weight)
        self.load_loss_weight = float(load_loss_weight)
        self.noise_epsilon = float(noise_epsilon)

    @property
    def choices_per_token(self):
        return self.k

    def build(self, input_shape):
        super().build(input_shape)
        check_k(self.k, self.num_experts)
        self.noise_kernel = self.add_gate_kernel("noise_kernel", input_shape)

    def noisy_gates(self, x, logits, training):
        """The `NoisyGates` of `logits` [G, S, E] (of float32 inputs `x` as
        given to `route`): noise eps * (softplus(x W_noise) + epsilon) in
        training only."""
        noise_stddev = noise = None
        if training:
            # Shape: [G, S, E]
            noise_stddev = (
                ops.softplus(self.gate_logits(x, self.noise_kernel)) + self.noise_epsilon
            )
            noise = keras.random.normal(ops.shape(logits), seed=self.seed_generator)
        return noisy_top_k_gates(logits, noise_stddev, noise, self.k)

    def route_with_gates(self, inputs, capacity, token_mask=None, training=False):
        """`route`, and the `NoisyGates` it routed (hierarchical MoE computes
        its losses from them). Returns (Routing, NoisyGates)."""
        x, logits, token_mask = self._gate_inputs(inputs, token_mask, training)
        gates = self.noisy_gates(x, logits, training)
        routing = noisy_top_k_routing(
            logits, gates, capacity, token_mask,
            self.importance_loss_weight, self.load_loss_weight,
        )
        return self._with_z_loss(routing, logits, token_mask), gates

    def _route(self, x, logits, capacity, token_mask, training):
        return noisy_top_k_routing(
            logits, self.noisy_gates(x, logits, training), capacity, token_mask,
            self.importance_loss_weight, self.load_loss_weight,
        )

    @property
    def loss_names(self):
        names = []
        if self.importance_loss_weight > 0:
            names.append("importance_loss")
        if self.load_loss_weight > 0:
            names.append("load_loss")
        return tuple(names) + super().loss_names

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "importance_loss_weight": self.importance_loss_weight,
                "load_loss_weight": self.load_loss_weight,
                "noise_epsilon": self.noise_epsilon,
            }
        )
        return config

