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

from tf_moe._validation import check_non_negative, check_positive_int
from tf_moe.routing import losses


class Routing(NamedTuple):
    """Routing instructions for one batch of token groups.

    A `NamedTuple` rather than a dataclass so that it passes through
    `tf.function`, `jax.jit` and `keras.tree` as a structure of tensors.

    Attributes:
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
        token_mask: <bool>[G, S] real tokens (false for group padding).
        router_probs: <float32>[G, S, E] router probabilities (statistics).
        aux_losses: dict name -> <float32>[] weighted auxiliary losses; only
            losses with a nonzero weight appear.
        num_experts: int, E.
        capacity: int, C.
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

    Subclasses implement `_route(x, logits, capacity, token_mask, training)`
    and set `choices_per_token` (the k used for capacity). The routing math
    always runs in float32, whatever the dtype policy (Switch Transformer:
    bfloat16 routers diverge).

    Args:
        num_experts: int >= 1, or None to let the `MoE` layer that uses this
            router set it (it uses a copy of this router bound to its
            `num_experts`).
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
        inputs: [..., d] token representations.
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
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_experts is not None:
            check_positive_int("num_experts", num_experts)
        check_non_negative("jitter_noise", jitter_noise)
        if jitter_noise >= 1:
            raise ValueError(
                f"`jitter_noise` must be in [0, 1). Received: jitter_noise={jitter_noise}"
            )
        check_non_negative("z_loss_weight", z_loss_weight)
        self.num_experts = num_experts
        self.jitter_noise = float(jitter_noise)
        self.z_loss_weight = float(z_loss_weight)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if self.num_experts is None:
            raise ValueError(
                f"Router {self.name!r} has no `num_experts`: pass it to the "
                "router, or use the router inside a `tf_moe.layers.MoE` layer. "
                "Received: num_experts=None"
            )
        d = input_shape[-1]
        # Never autocast: routing math stays float32 under mixed precision.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(d, self.num_experts),
            initializer=self.kernel_initializer,
            autocast=False,
        )

    def call(self, inputs):
        return ops.matmul(ops.cast(inputs, "float32"), self.kernel)

    def route(self, inputs, capacity, token_mask=None, training=False):
        """Routes groups of tokens.

        Args:
            inputs: [G, S, d] token groups (any float dtype).
            capacity: int >= 1, slots per expert per group (C).
            token_mask: <bool>[G, S] real tokens, or None for all.
            training: bool; noise and jitter apply only when true.

        Returns:
            A `Routing`.
        """
        if not self.built:
            self.build(inputs.shape)
        x = ops.cast(inputs, "float32")  # [G, S, d]
        if token_mask is None:
            token_mask = ops.ones(ops.shape(x)[:2], dtype="bool")
        if training and self.jitter_noise > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
                seed=self.seed_generator,
            )
        logits = ops.einsum("gsd,de->gse", x, self.kernel)  # [G, S, E]
        routing = self._route(x, logits, capacity, token_mask, bool(training))
        if self.z_loss_weight > 0:
            z_loss = self.z_loss_weight * losses.router_z_loss(logits, token_mask)
            routing = routing._replace(
                aux_losses={**routing.aux_losses, "z_loss": z_loss}
            )
        return routing

    def _route(self, x, logits, capacity, token_mask, training):
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
                "jitter_noise": self.jitter_noise,
                "z_loss_weight": self.z_loss_weight,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
