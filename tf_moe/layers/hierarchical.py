"""Two-level hierarchical MoE (Shazeer et al. 2017, appendix B).

A primary noisy top-k gate picks k1 of `num_groups` (a) expert groups; inside
each group a secondary noisy top-k gate picks k2 of its `experts_per_group` (b)
experts: y = sum_i G_primary(x)_i sum_j G_i(x)_j E_ij(x).

Implemented as two nested dispatches: tokens -> primary buffers [a, G, C1, d];
each primary buffer row is a token group of the secondary routing (empty slots
are padding) -> [b, G * a, C2, d] -> the a * b experts -> combine twice. Both
levels gate through `NoisyTopKRouter`s: `primary_router` over the a groups
and `secondary_router`, a bank of a gates over b experts each (kernels
[a, d, b]); their noise, seeds and weights are the routers'.

Shape letters: G groups, S group size, d model dim, a primary groups,
b experts per group, C1/C2 primary/secondary capacity, k choices.
"""

import keras
from keras import ops

from tf_moe import metrics
from tf_moe._replicas import global_sum
from tf_moe._validation import check_k, check_non_negative, check_positive_int
from tf_moe.layers.moe import GroupedMoELayer
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.routing import NoisyTopKRouter, losses


def hierarchical_importance(slot_gate, secondary_gates):
    """Importance_H(X)_{i,j} = sum_x G_primary(x)_i G_i(x)_j (appendix B).

    Args:
        slot_gate: <float32>[a, G, C1] primary gate of the token in each slot
            (0 for empty slots).
        secondary_gates: <float32>[a, G, C1, b] secondary gates of each slot.

    Returns:
        <float32>[a, b], over every replica's tokens under tf.distribute.
    """
    return global_sum(ops.einsum("agc,agcb->ab", slot_gate, secondary_gates))


def hierarchical_load(primary_load, secondary_load_probs, occupied):
    """Load_H(X)_{i,j} = Load_primary(X)_i Load_i(X^(i))_j / |X^(i)| (appendix B).

    Args:
        primary_load: <float32>[a] Load_primary(X).
        secondary_load_probs: <float32>[a, G, C1, b] P(x, j) of each slot.
        occupied: <bool>[a, G, C1] slots holding a token (X^(i) of group i).

    Returns:
        <float32>[a, b].
    """
    occupied = ops.cast(occupied, "float32")
    secondary_load = global_sum(ops.einsum("agcb,agc->ab", secondary_load_probs, occupied))
    group_tokens = ops.maximum(global_sum(ops.sum(occupied, axis=(1, 2))), 1.0)  # [a]
    return primary_load[:, None] * secondary_load / group_tokens[:, None]


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoE(GroupedMoELayer):
    """Hierarchical MoE: a primary gate over expert groups, secondary gates
    within groups, a * b experts in all.

    Both gates are noisy top-k gates (`NoisyTopKRouter`: zero-initialized,
    noise in training only). Losses: the primary gate's importance and load
    losses, and the hierarchical importance and load losses over all a * b
    experts (appendix B), each weighted by `importance_loss_weight` /
    `load_loss_weight`. Capacity applies at both levels with the same factor:
    C1 = ceil(f * S * k1 / a), C2 = ceil(f * C1 * k2 / b). The statistics'
    `expert_load` covers all a * b experts (expert (i, j) at i * b + j).

    Args:
        num_groups: int >= 1, a.
        experts_per_group: int >= 1, b.
        expert_hidden_dim: int >= 1.
        primary_k: int in [1, a], default 2.
        secondary_k: int in [1, b], default 2.
        expert_activation, expert_dropout, expert_use_bias: as for `MoE`.
        capacity_factor, eval_capacity_factor, min_capacity, group_size,
        dispatch: as for `MoE`, except that a None capacity factor always
            means C = S here (no dropless path).
        importance_loss_weight: float >= 0, default 0.1.
        load_loss_weight: float >= 0, default 0.1.
        noise_epsilon: float >= 0, default 1e-2.
        seed: int or None.
        expert_kernel_initializer: as for `MoE`.

    Call arguments / shapes: as for `MoE`.

    Example:
    >>> layer = HierarchicalMoE(2, 4, expert_hidden_dim=16, group_size=8)
    >>> tuple(layer(keras.random.normal((2, 8, 16))).shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        expert_hidden_dim,
        primary_k=2,
        secondary_k=2,
        expert_activation="relu",
        expert_dropout=0.0,
        expert_use_bias=True,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        group_size=1024,
        dispatch="auto",
        importance_loss_weight=0.1,
        load_loss_weight=0.1,
        noise_epsilon=1e-2,
        seed=None,
        expert_kernel_initializer=None,
        **kwargs,
    ):
        check_positive_int("num_groups", num_groups)
        check_positive_int("experts_per_group", experts_per_group)
        check_k(primary_k, num_groups, "primary_k", "num_groups")
        check_k(secondary_k, experts_per_group, "secondary_k", "experts_per_group")
        check_non_negative("importance_loss_weight", importance_loss_weight)
        check_non_negative("load_loss_weight", load_loss_weight)
        check_non_negative("noise_epsilon", noise_epsilon)
        super().__init__(
            num_groups * experts_per_group,
            expert_hidden_dim,
            expert_activation=expert_activation,
            expert_dropout=expert_dropout,
            expert_use_bias=expert_use_bias,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            group_size=group_size,
            dispatch=dispatch,
            expert_kernel_initializer=expert_kernel_initializer,
            **kwargs,
        )
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.primary_k = primary_k
        self.secondary_k = secondary_k
        self.importance_loss_weight = float(importance_loss_weight)
        self.load_loss_weight = float(load_loss_weight)
        self.noise_epsilon = float(noise_epsilon)
        self.seed = seed
        self.primary_router = NoisyTopKRouter(
            k=primary_k,
            num_experts=num_groups,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
            noise_epsilon=noise_epsilon,
            seed=seed,
            name="primary_router",
        )
        # The hierarchical losses replace the secondary gates' own.
        self.secondary_router = NoisyTopKRouter(
            k=secondary_k,
            num_experts=experts_per_group,
            num_gates=num_groups,
            importance_loss_weight=0.0,
            load_loss_weight=0.0,
            noise_epsilon=noise_epsilon,
            seed=None if seed is None else seed + 1,
            name="secondary_router",
        )

    def build(self, input_shape):
        super().build(input_shape)
        d, a, b = self.feature_dim, self.num_groups, self.experts_per_group
        self.primary_router.build((None, None, d))
        self.secondary_router.build((a, None, None, d))
        self.experts.build((a * b, None, None, d))

    @property
    def loss_names(self):
        names = []
        if self.importance_loss_weight > 0:
            names += ["importance_loss", "hierarchical_importance_loss"]
        if self.load_loss_weight > 0:
            names += ["load_loss", "hierarchical_load_loss"]
        return tuple(names)

    @property
    def active_expert_fraction(self):
        return (self.primary_k * self.secondary_k) / (
            self.num_groups * self.experts_per_group
        )

    # Two nested levels of capacity buffers; no dropless rows.
    supports_rows = False

    def stat_shapes(self):
        shapes = {"expert_load": (self.num_groups * self.experts_per_group,)}
        names = metrics.SCALAR_STATS + ("secondary_dropped_fraction",) + self.loss_names
        shapes.update({name: () for name in names})
        return shapes

    def route_and_compute(self, plan, groups, token_mask, training):
        a, b, d = self.num_groups, self.experts_per_group, self.feature_dim
        capacity1 = plan.capacity(groups.shape[1], a, self.primary_k, self.min_capacity)
        primary, gates1 = self.primary_router.route_with_gates(
            groups, capacity1, token_mask, training
        )
        buffers = plan.dispatch(groups, primary)  # [a, G, C1, d]
        occupied = dispatch_lib.slot_mask(primary)  # [a, G, C1]

        # Secondary gates: gate i routes the rows of primary buffer i, each
        # row of C1 slots one group (empty slots are padding). The groups
        # are g-major ([G * a, C1]) so that a mesh sharding G keeps them.
        capacity2 = plan.capacity(capacity1, b, self.secondary_k, self.min_capacity)
        by_group = ops.transpose(buffers, (1, 0, 2, 3))  # [G, a, C1, d]
        secondary, gates2 = self.secondary_router.route_with_gates(
            by_group, capacity2, ops.transpose(occupied, (1, 0, 2)), training
        )  # over [G * a, C1] groups
        # Shape: [b, G * a, C2, d] -> [a * b, G, C2, d], expert (i, j) at i * b + j.
        inner = plan.dispatch(ops.reshape(by_group, (-1, capacity1, d)), secondary)
        inner = ops.reshape(inner, (b, -1, a, capacity2, d))
        inner = ops.reshape(ops.transpose(inner, (2, 0, 1, 3, 4)), (a * b, -1, capacity2, d))
        outputs = self.experts(plan.to_experts(inner), training=training)
        outputs = plan.to_groups(outputs)  # [a * b, G, C2, d]
        outputs = ops.reshape(outputs, (a, b, -1, capacity2, d))
        outputs = ops.reshape(ops.transpose(outputs, (1, 2, 0, 3, 4)), (b, -1, capacity2, d))
        outputs = plan.combine(outputs, secondary)  # [G * a, C1, d]
        outputs = ops.transpose(ops.reshape(outputs, (-1, a, capacity1, d)), (1, 0, 2, 3))
        outputs = plan.combine(outputs, primary)  # [G, S, d]

        def per_primary(t):  # [G * a, C1, ...] -> [a, G, C1, ...]
            t = ops.reshape(t, (-1, a) + tuple(t.shape[1:]))
            return ops.transpose(t, (1, 0) + tuple(range(2, len(t.shape))))

        stats = metrics.routing_stats(primary)  # incl. the primary losses
        secondary_stats = metrics.routing_stats(secondary)
        stats["secondary_dropped_fraction"] = secondary_stats["dropped_fraction"]
        # Shape: [G * a, b] routed choices -> [a * b] over all experts.
        per_group = ops.einsum(
            "nckb,nck->nb",
            ops.one_hot(secondary.expert_index, b),
            ops.cast(secondary.dispatch_mask, "float32"),
        )
        load = ops.reshape(ops.sum(ops.reshape(per_group, (-1, a, b)), axis=0), (-1,))
        stats["expert_load"] = load / ops.maximum(ops.sum(load), 1.0)
        if self.importance_loss_weight > 0:
            importance = hierarchical_importance(
                dispatch_lib.slot_weight(primary), per_primary(gates2.dense_gates)
            )
            stats["hierarchical_importance_loss"] = self.importance_loss_weight * (
                losses.cv_squared(ops.reshape(importance, (-1,)))
            )
        if self.load_loss_weight > 0:
            mask = ops.cast(token_mask, "float32")[..., None]
            primary_load = global_sum(ops.sum(gates1.load_probs * mask, axis=(0, 1)))  # [a]
            load = hierarchical_load(primary_load, per_primary(gates2.load_probs), occupied)
            stats["hierarchical_load_loss"] = self.load_loss_weight * (
                losses.cv_squared(ops.reshape(load, (-1,)))
            )
        return outputs, stats

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_groups": self.num_groups,
                "experts_per_group": self.experts_per_group,
                "primary_k": self.primary_k,
                "secondary_k": self.secondary_k,
                "importance_loss_weight": self.importance_loss_weight,
                "load_loss_weight": self.load_loss_weight,
                "noise_epsilon": self.noise_epsilon,
                "seed": self.seed,
            }
        )
        return config
