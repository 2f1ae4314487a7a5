"""Two-level hierarchical MoE (Shazeer et al. 2017, appendix B).

A primary noisy top-k gate picks k1 of `num_groups` (a) expert groups; inside
each group a secondary noisy top-k gate picks k2 of its `experts_per_group` (b)
experts: y = sum_i G_primary(x)_i sum_j G_i(x)_j E_ij(x).

Implemented as two nested dispatches: tokens -> primary buffers [a, G, C1, d];
each primary buffer row is a token group of the secondary routing (empty slots
are padding) -> [b, a * G, C2, d] -> the a * b experts -> combine twice.

Shape letters: G groups, S group size, d model dim, a primary groups,
b experts per group, C1/C2 primary/secondary capacity, k choices.
"""

import keras
from keras import ops

from tf_moe import metrics
from tf_moe._validation import check_k, check_non_negative, check_positive_int
from tf_moe.layers.moe import GroupedMoELayer
from tf_moe.ops import dispatch as dispatch_lib
from tf_moe.routing import losses, noisy_top_k_routing


def hierarchical_importance(slot_gate, secondary_gates):
    """Importance_H(X)_{i,j} = sum_x G_primary(x)_i G_i(x)_j (appendix B).

    Args:
        slot_gate: <float32>[a, G, C1] primary gate of the token in each slot
            (0 for empty slots).
        secondary_gates: <float32>[a, G, C1, b] secondary gates of each slot.

    Returns:
        <float32>[a, b].
    """
    return ops.einsum("agc,agcb->ab", slot_gate, secondary_gates)


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
    secondary_load = ops.einsum("agcb,agc->ab", secondary_load_probs, occupied)
    group_tokens = ops.maximum(ops.sum(occupied, axis=(1, 2)), 1.0)  # [a]
    return primary_load[:, None] * secondary_load / group_tokens[:, None]


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoE(GroupedMoELayer):
    """Hierarchical MoE: a primary gate over expert groups, secondary gates
    within groups, a * b experts in all.

    Both gates are noisy top-k gates (zero-initialized, noise in training
    only). Losses: the primary gate's importance and load losses, and the
    hierarchical importance and load losses over all a * b experts (appendix
    B), each weighted by `importance_loss_weight` / `load_loss_weight`.
    Capacity applies at both levels with the same factor:
    C1 = ceil(f * S * k1 / a), C2 = ceil(f * C1 * k2 / b).

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
        check_k(primary_k, num_groups)
        check_k(secondary_k, experts_per_group)
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
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        super().build(input_shape)
        d, a, b = self.feature_dim, self.num_groups, self.experts_per_group

        def gate(name, shape):
            # Zero init (paper, appendix A); float32 under any dtype policy.
            return self.add_weight(
                name=name, shape=shape, initializer="zeros", dtype="float32",
                autocast=False,
            )

        self.primary_kernel = gate("primary_kernel", (d, a))
        self.primary_noise_kernel = gate("primary_noise_kernel", (d, a))
        self.secondary_kernel = gate("secondary_kernel", (a, d, b))
        self.secondary_noise_kernel = gate("secondary_noise_kernel", (a, d, b))
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

    def stat_shapes(self):
        shapes = {"expert_load": (self.num_groups,)}
        names = metrics.SCALAR_STATS + ("secondary_dropped_fraction",) + self.loss_names
        shapes.update({name: () for name in names})
        return shapes

    def _noise(self, x, kernel_equation, noise_kernel, logits, training):
        """(stddev, noise) of noisy gating, or (None, None) outside training."""
        if not training:
            return None, None
        stddev = ops.softplus(ops.einsum(kernel_equation, x, noise_kernel))
        noise = keras.random.normal(ops.shape(logits), seed=self.seed_generator)
        return stddev + self.noise_epsilon, noise

    def route_and_compute(self, groups, token_mask, training):
        a, b, d = self.num_groups, self.experts_per_group, self.feature_dim
        dispatch, combine = self._dispatchers()
        # Primary gate over groups.
        x = ops.cast(groups, "float32")  # [G, S, d]
        logits = ops.einsum("gsd,da->gsa", x, self.primary_kernel)  # [G, S, a]
        stddev, noise = self._noise(
            x, "gsd,da->gsa", self.primary_noise_kernel, logits, training
        )
        capacity1 = self._capacity(groups.shape[1], a, self.primary_k, training)
        primary, primary_gates, primary_load_probs = noisy_top_k_routing(
            logits, stddev, noise, self.primary_k, capacity1, token_mask
        )
        buffers = dispatch(groups, primary)  # [a, G, C1, d]
        occupied = dispatch_lib.slot_mask(primary)  # [a, G, C1]

        # Secondary gates: each primary buffer row is one routing group.
        xb = ops.cast(buffers, "float32")
        logits2 = ops.einsum("agcd,adb->agcb", xb, self.secondary_kernel)
        stddev2, noise2 = self._noise(
            xb, "agcd,adb->agcb", self.secondary_noise_kernel, logits2, training
        )

        def as_groups(t):  # [a, G, C1, ...] -> [a * G, C1, ...]
            return None if t is None else ops.reshape(t, (-1,) + tuple(t.shape[2:]))

        capacity2 = self._capacity(capacity1, b, self.secondary_k, training)
        secondary, secondary_gates, secondary_load_probs = noisy_top_k_routing(
            as_groups(logits2),
            as_groups(stddev2),
            as_groups(noise2),
            self.secondary_k,
            capacity2,
            as_groups(occupied),
        )
        # Shape: [b, a * G, C2, d] -> [a * b, G, C2, d], expert (i, j) at i * b + j.
        inner = dispatch(as_groups(buffers), secondary)
        inner = ops.reshape(inner, (b, a, -1, capacity2, d))
        inner = ops.reshape(ops.transpose(inner, (1, 0, 2, 3, 4)), (a * b, -1, capacity2, d))
        outputs = self.experts(inner, training=training)  # [a * b, G, C2, d]
        outputs = ops.reshape(outputs, (a, b, -1, capacity2, d))
        outputs = ops.reshape(ops.transpose(outputs, (1, 0, 2, 3, 4)), (b, -1, capacity2, d))
        outputs = combine(outputs, secondary)  # [a * G, C1, d]
        outputs = combine(ops.reshape(outputs, (a, -1, capacity1, d)), primary)

        stats = metrics.routing_stats(primary)
        stats["secondary_dropped_fraction"] = metrics.routing_stats(secondary)[
            "dropped_fraction"
        ]
        secondary_gates = ops.reshape(secondary_gates, (a, -1, capacity1, b))
        if self.importance_loss_weight > 0:
            importance = hierarchical_importance(
                dispatch_lib.slot_weight(primary), secondary_gates
            )
            stats["importance_loss"] = self.importance_loss_weight * (
                losses.importance_loss(primary_gates, token_mask)
            )
            stats["hierarchical_importance_loss"] = self.importance_loss_weight * (
                losses.cv_squared(ops.reshape(importance, (-1,)))
            )
        if self.load_loss_weight > 0:
            mask = ops.cast(token_mask, "float32")[..., None]
            primary_load = ops.sum(primary_load_probs * mask, axis=(0, 1))  # [a]
            load = hierarchical_load(
                primary_load,
                ops.reshape(secondary_load_probs, (a, -1, capacity1, b)),
                occupied,
            )
            stats["load_loss"] = self.load_loss_weight * (
                losses.load_loss(primary_load_probs, token_mask)
            )
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
