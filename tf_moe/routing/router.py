"""The `Routing` contract and the `Router` base layer.

A router turns token representations into a `Routing`: which expert each
token's choices go to, at which slot of that expert's buffer, with which
combine weight, and the auxiliary losses of the routing. A router never touches
expert weights; a dispatch implementation never decides routing.

Owns: `Routing`, `Router` (gate kernel, float32 routing math, jitter, z-loss).
Does not own: the routing rules (subclasses), dispatch (`tf_moe.ops`).

Shape letters: G groups, S tokens per group, d model dim, E experts,
C expert capacity (slots per expert per group), k choices per token.
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from tf_moe._groups import scatter_add_per_group
from tf_moe._validation import check_initializer, check_non_negative, check_positive_int
from tf_moe.routing import capacity as capacity_lib
from tf_moe.routing import losses


class Routing(NamedTuple):
    """Routing instructions for one batch of token groups.

    A `NamedTuple` rather than a dataclass so that it passes through
    `tf.function`, `jax.jit` and `keras.tree` as a structure of tensors.
    Build one with `Routing.from_choices` (token choice: each token's k
    choices) or `Routing.from_slots` (expert choice: each expert's C slots);
    every router does.

    Token-major view (every routing has it):
        expert_index: <int32>[G, S, k] expert of each token's choice.
        position: <int32>[G, S, k] slot of each choice in its expert's buffer;
            meaningful only where `dispatch_mask` is true (it may be >= C
            where the choice was dropped for capacity).
        dispatch_mask: <bool>[G, S, k] the choice is routed: requested by the
            router, a real (non-padding) token, and within capacity.
        combine_weight: <float32>[G, S, k] gate value of each choice; exactly 0
            where `dispatch_mask` is false.
        requested_mask: <bool>[G, S, k] the router wanted this choice, before
            capacity was applied (for the dropped-fraction statistic).
    Shared:
        token_mask: <bool>[G, S] real tokens (false for group padding).
        router_probs: <float32>[G, S, E] router probabilities (statistics).
        aux_losses: dict name -> <float32>[] weighted auxiliary losses; only
            losses with a nonzero weight appear.
        num_experts: int, E.
        capacity: int, C.
    Slot-major view (`from_slots` only; None for token choice):
        slot_token: <int32>[G, E, C] token (index s in its group) in each
            expert slot; S for an empty slot.
        slot_weight: <float32>[G, E, C] combine weight of each slot; 0 where
            empty.
    Dispatch paths that can move rows by slot use the slot-major view (work
    O(E * C * d) per group); the token-major view of a `from_slots` routing
    has k = E (choice j of every token is expert j) and costs O(S * E)
    indices, no d.
    """

    expert_index: object
    position: object
    dispatch_mask: object
    combine_weight: object
    requested_mask: object
    token_mask: object
    router_probs: object
    aux_losses: dict
    num_experts: int
    capacity: int
    slot_token: object = None
    slot_weight: object = None

    @classmethod
    def from_choices(cls, expert_index, weights, requested_mask, token_mask,
                     router_probs, capacity, priority=None, aux_losses=None):
        """A token-choice routing: slots assigned rank by rank, capacity applied.

        Args:
            expert_index: <int32>[G, S, k] each choice's expert.
            weights: <float32>[G, S, k] each choice's gate value.
            requested_mask: <bool>[G, S, k] choices the router wants (already
                false for padding tokens).
            token_mask: <bool>[G, S].
            router_probs: <float32>[G, S, E].
            capacity: int, C.
            priority: <float32>[G, S] or None; see
                `tf_moe.routing.capacity.assign_positions`.
            aux_losses: dict of weighted losses, or None.
        """
        expert_index = ops.cast(expert_index, "int32")
        num_experts = router_probs.shape[-1]
        position = capacity_lib.assign_positions(
            expert_index, requested_mask, num_experts, priority
        )
        kept = capacity_lib.apply_capacity(position, requested_mask, capacity)
        return cls(
            expert_index=expert_index,
            position=position,
            dispatch_mask=kept,
            combine_weight=ops.where(kept, weights, 0.0),
            requested_mask=requested_mask,
            token_mask=token_mask,
            router_probs=router_probs,
            aux_losses=dict(aux_losses or {}),
            num_experts=num_experts,
            capacity=capacity,
        )

    @classmethod
    def from_slots(cls, slot_token, slot_weight, token_mask, router_probs,
                   aux_losses=None):
        """An expert-choice routing from each expert's slots.

        Args:
            slot_token: <int32>[G, E, C] token of each slot, S where empty.
                Each token appears at most once per expert.
            slot_weight: <float32>[G, E, C], 0 where empty.
            token_mask: <bool>[G, S].
            router_probs: <float32>[G, S, E].
            aux_losses: dict of weighted losses, or None.
        """
        group_size, num_experts = router_probs.shape[1:]
        capacity = slot_token.shape[-1]
        slot_token = ops.cast(slot_token, "int32")
        filled = slot_token < group_size  # [G, E, C]
        slot_weight = ops.where(filled, slot_weight, 0.0)
        # Token-major view: choice (s, e) of a group is slot c of expert e,
        # found by scattering every filled slot to s * E + e within its group;
        # the empty slots all land in one extra entry, sliced off.
        expert = ops.arange(num_experts, dtype="int32")[None, :, None]  # [1, E, 1]
        num_choices = group_size * num_experts
        choice = ops.where(filled, slot_token * num_experts + expert, num_choices)
        choice = ops.reshape(choice, (-1, num_experts * capacity))  # [G, E * C]
        slot = ops.broadcast_to(
            ops.arange(1, capacity + 1, dtype="int32"), ops.shape(slot_token)
        )  # [G, E, C], slot + 1

        def to_choices(values):  # [G, E, C] -> [G, S, E]
            values = ops.reshape(values, (-1, num_experts * capacity))
            scattered = scatter_add_per_group(values, choice, num_choices + 1)
            return ops.reshape(scattered[:, :num_choices], (-1, group_size, num_experts))

        position = to_choices(ops.where(filled, slot, 0)) - 1  # -1: not chosen
        chosen = position >= 0
        expert_index = ops.broadcast_to(
            ops.arange(num_experts, dtype="int32"), ops.shape(position)
        )
        return cls(
            expert_index=expert_index,
            position=ops.cast(position, "int32"),
            dispatch_mask=chosen,
            combine_weight=to_choices(slot_weight),
            requested_mask=chosen,
            token_mask=token_mask,
            router_probs=router_probs,
            aux_losses=dict(aux_losses or {}),
            num_experts=num_experts,
            capacity=capacity,
            slot_token=slot_token,
            slot_weight=slot_weight,
        )

    @property
    def slot_major(self):
        """Whether this routing carries the slot-major view."""
        return self.slot_token is not None


def expert_capacity(
    group_size, num_experts, capacity_factor, choices_per_token=1, min_capacity=1
):
    """Slots per expert per group: ceil(capacity_factor * S * k / E).

    Clipped to [min_capacity, group_size]; `capacity_factor=None` means no
    token is ever dropped (C = S, since an expert sees each token at most
    once).

    Returns:
        int, the capacity C.
    """
    if capacity_factor is None:
        return group_size
    capacity = math.ceil(capacity_factor * group_size * choices_per_token / num_experts)
    return int(min(group_size, max(min_capacity, capacity)))


@keras.saving.register_keras_serializable(package="tf_moe")
class Router(keras.layers.Layer):
    """Base router: gate kernel, float32 routing math, jitter noise, z-loss.

    Subclasses implement `_route(x, logits, capacity, token_mask, training)
    -> Routing` (one of the pure routing functions of their module) and set
    `choices_per_token` (the k used for capacity). The routing math always
    runs in float32, whatever the dtype policy (Switch Transformer: bfloat16
    routers diverge).

    Args:
        num_experts: int >= 1, or None to let the `MoE` layer that uses this
            router set it (it uses a copy of this router bound to its
            `num_experts`).
        num_gates: int >= 1 or None (default). With an int A, the router is a
            bank of A independent gates (kernels [A, d, E]): `route` takes
            inputs [G, A, S, d] and routes row a of every group with gate a
            (hierarchical MoE's secondary gates); the `Routing` is over
            [G * A, S] groups, g-major (so a mesh that shards G keeps them
            in place).
        jitter_noise: float >= 0, default 0. During training, multiplies the
            router inputs by Uniform(1 - jitter_noise, 1 + jitter_noise)
            (Switch Transformer).
        z_loss_weight: float >= 0, default 1e-3. Weight of the router z-loss
            (ST-MoE); 0 disables it.
        kernel_initializer: initializer of the gate kernel [d, E].
        seed: int or None, seed of the router's random draws.
        **kwargs: base `Layer` arguments (`name`, ...). `dtype` defaults to
            "float32".

    Call arguments (`call`):
        inputs: [..., d] token representations ([..., A, d] for a bank).
    Returns the router logits [..., E] (float32). The full `Routing` comes from
    `route()`.
    """

    choices_per_token = 1
    # Each token picks its experts (top-k style): with no capacity limit the
    # routing drops nothing, so a layer may run it dropless. False where the
    # capacity is the routing rule itself (expert choice).
    token_choice = True

    def __init__(
        self,
        num_experts=None,
        jitter_noise=0.0,
        z_loss_weight=1e-3,
        kernel_initializer="zeros",
        seed=None,
        num_gates=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_experts is not None:
            check_positive_int("num_experts", num_experts)
        if num_gates is not None:
            check_positive_int("num_gates", num_gates)
        check_non_negative("jitter_noise", jitter_noise)
        if jitter_noise >= 1:
            raise ValueError(
                f"`jitter_noise` must be in [0, 1). Received: jitter_noise={jitter_noise}"
            )
        check_non_negative("z_loss_weight", z_loss_weight)
        self.num_experts = num_experts
        self.num_gates = num_gates
        self.jitter_noise = float(jitter_noise)
        self.z_loss_weight = float(z_loss_weight)
        self.kernel_initializer = check_initializer("kernel_initializer", kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def add_gate_kernel(self, name, input_shape):
        """A float32 gate kernel [d, E] ([A, d, E] for a bank of A gates)."""
        shape = (input_shape[-1], self.num_experts)
        if self.num_gates is not None:
            shape = (self.num_gates,) + shape
        # Never autocast: routing math stays float32 under mixed precision.
        return self.add_weight(
            name=name, shape=shape, initializer=self.kernel_initializer, autocast=False
        )

    def build(self, input_shape):
        if self.num_experts is None:
            raise ValueError(
                f"Router {self.name!r} has no `num_experts`: pass it to the "
                "router, or use the router inside a `tf_moe.layers.MoE` layer. "
                "Received: num_experts=None"
            )
        self.kernel = self.add_gate_kernel("kernel", input_shape)

    def gate_logits(self, x, kernel):
        """x [G, S, d] @ kernel [d, E] -> [G, S, E]; for a bank, x [G, A, S, d]
        @ kernel [A, d, E] -> [G * A, S, E] (g-major)."""
        if self.num_gates is None:
            return ops.einsum("gsd,de->gse", x, kernel)
        logits = ops.einsum("gasd,ade->gase", x, kernel)  # [G, A, S, E]
        return ops.reshape(logits, (-1,) + tuple(logits.shape[2:]))

    def call(self, inputs):
        if self.num_gates is None:
            return ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        return ops.einsum("...ad,ade->...ae", ops.cast(inputs, "float32"), self.kernel)

    def route(self, inputs, capacity, token_mask=None, training=False):
        """Routes groups of tokens.

        Args:
            inputs: [G, S, d] token groups (any float dtype); [G, A, S, d]
                for a bank of A gates.
            capacity: int >= 1, slots per expert per group (C).
            token_mask: <bool>[G, S] ([G, A, S]) real tokens, or None for all.
            training: bool; noise and jitter apply only when true.

        Returns:
            A `Routing` over [G, S] groups ([G * A, S] for a bank).
        """
        x, logits, token_mask = self._gate_inputs(inputs, token_mask, training)
        routing = self._route(x, logits, capacity, token_mask, bool(training))
        return self._with_z_loss(routing, logits, token_mask)

    def _gate_inputs(self, inputs, token_mask, training):
        """(float32 inputs after jitter, logits [G, S, E], token_mask [G, S])."""
        if not self.built:
            self.build(inputs.shape)
        x = ops.cast(inputs, "float32")  # [G, S, d] or [G, A, S, d]
        if token_mask is None:
            token_mask = ops.ones(ops.shape(x)[:-1], dtype="bool")
        token_mask = ops.reshape(token_mask, (-1, x.shape[-2]))  # [G, S]
        if training and self.jitter_noise > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
                seed=self.seed_generator,
            )
        return x, self.gate_logits(x, self.kernel), token_mask

    def _with_z_loss(self, routing, logits, token_mask):
        if self.z_loss_weight <= 0:
            return routing
        z_loss = self.z_loss_weight * losses.router_z_loss(logits, token_mask)
        return routing._replace(aux_losses={**routing.aux_losses, "z_loss": z_loss})

    def _route(self, x, logits, capacity, token_mask, training):
        """x: the (jittered) float32 inputs as given to `route`; logits,
        token_mask: [G, S, E], [G, S] -> a `Routing` (without the z-loss)."""
        raise NotImplementedError

    def experts_per_token(self, capacity_factor):
        """Average number of experts that process a token (for active
        parameter counts): k for token choice."""
        return self.choices_per_token

    @property
    def loss_names(self):
        """Names of the losses `route()` returns in `Routing.aux_losses`."""
        return ("z_loss",) if self.z_loss_weight > 0 else ()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "num_gates": self.num_gates,
                "jitter_noise": self.jitter_noise,
                "z_loss_weight": self.z_loss_weight,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
