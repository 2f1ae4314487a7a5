"""The sparsely-gated Mixture-of-Experts layer.

Flow: x [B, d] or [B, L, d] -> tokens [T, d] -> groups [G, S, d] (the last
group padded; padding is never routed) -> router -> `Routing` -> dispatch
[E, G, C, d] -> experts -> combine [G, S, d] -> y, same shape as x.

Owns: grouping, `add_loss` of the router's auxiliary losses, the last
routing statistics. Each call resolves one `tf_moe.ops.DispatchPlan` (path,
dropless, capacity) and hands it the routed groups.
Does not own: routing rules (`tf_moe.routing`), the choice and math of
dispatch (`tf_moe.ops.plan`, `tf_moe.ops`), expert math
(`tf_moe.layers.experts`).

Shape letters: B batch, L length, T tokens, d model dim, G groups, S group size,
E experts, C capacity, k choices per token.
"""

import keras
from keras import ops

from tf_moe import metrics
from tf_moe._replicas import ReplicaLocalLosses
from tf_moe._validation import (
    check_capacity_factor,
    check_choice,
    check_fraction,
    check_initializer,
    check_k,
    check_positive_int,
)
from tf_moe.layers.experts import EXPERT_ACTIVATIONS, Experts
from tf_moe.ops import plan as plan_lib
from tf_moe.ops.dispatch import DISPATCH_METHODS
from tf_moe.routing import Router, TopKRouter


# Statistic of every MoE layer: the fraction of tokens with a NaN or inf.
NONFINITE = "nonfinite_fraction"


def bind_router(router, num_experts):
    """The router to use for `num_experts` experts: an unbuilt `router` is
    copied, bound to `num_experts` and named "router" (so that its weights
    have the stable path `<layer>/router/kernel` that layout rules match); a
    built one (shared between layers) is used as it is."""
    if router is None:
        router = TopKRouter(k=2)
    if isinstance(router, dict):
        router = keras.saving.deserialize_keras_object(router)
    if not isinstance(router, Router):
        raise ValueError(
            "`router` must be a `tf_moe.routing.Router` (e.g. TopKRouter(k=2)) or "
            f"None. Received: router={router!r}"
        )
    check_k(router.choices_per_token, num_experts)
    if router.num_gates is not None:
        raise ValueError(
            "`router` must be a single gate: `num_gates` makes a bank of gates "
            "(HierarchicalMoE's secondary gates). Received: "
            f"router.num_gates={router.num_gates}"
        )
    if router.num_experts is not None and router.num_experts != num_experts:
        raise ValueError(
            "`router.num_experts` must equal `num_experts`. Received: "
            f"router.num_experts={router.num_experts}, num_experts={num_experts}"
        )
    if router.built:
        return router
    config = router.get_config()
    config.update(num_experts=num_experts, name="router")
    return router.__class__.from_config(config)


def _unbuilt(serialized):
    """A sub-layer's serialized config without its build config, so that it
    is built by the parent's `build` and its variables keep the parent's path
    (`moe/router/kernel`) after loading."""
    return {k: v for k, v in serialized.items() if k != "build_config"}


class GroupedMoELayer(ReplicaLocalLosses, keras.layers.Layer):
    """Shared plumbing of the MoE layers: expert and capacity arguments, input
    checks, token groups, aux losses and routing statistics. Subclasses
    implement `route_and_compute(plan, groups, token_mask, training) ->
    (outputs, stats)`, `stat_shapes()`, `loss_names` and
    `active_expert_fraction`.

    Args:
        total_experts: int >= 1, the number of expert FFNs (validated by the
            subclass under its own argument names).
        expert_hidden_dim, expert_activation, expert_dropout, expert_use_bias,
        capacity_factor, eval_capacity_factor, min_capacity, group_size,
        dispatch, expert_kernel_initializer: as documented by `MoE`.
        **kwargs: base `Layer` arguments.
    """

    def __init__(
        self,
        total_experts,
        expert_hidden_dim,
        expert_activation="relu",
        expert_dropout=0.0,
        expert_use_bias=True,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        group_size=1024,
        dispatch="auto",
        expert_kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("expert_hidden_dim", expert_hidden_dim)
        check_choice("expert_activation", expert_activation, EXPERT_ACTIVATIONS)
        check_fraction("expert_dropout", expert_dropout)
        check_capacity_factor("capacity_factor", capacity_factor)
        check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        check_positive_int("min_capacity", min_capacity)
        check_positive_int("group_size", group_size)
        check_choice("dispatch", dispatch, DISPATCH_METHODS)
        check_initializer("expert_kernel_initializer", expert_kernel_initializer)
        self.expert_hidden_dim = expert_hidden_dim
        self.expert_activation = expert_activation
        self.expert_dropout = expert_dropout
        self.expert_use_bias = expert_use_bias
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.group_size = group_size
        self.dispatch = dispatch
        self.expert_kernel_initializer = expert_kernel_initializer
        self.experts = Experts(
            total_experts,
            expert_hidden_dim,
            activation=expert_activation,
            use_bias=expert_use_bias,
            dropout=expert_dropout,
            kernel_initializer=expert_kernel_initializer,
            dtype=self.dtype_policy,
            name="experts",
        )

    # Whether the experts can run on expert-sorted rows (dropless).
    supports_rows = True

    def plan(self, training):
        """The `tf_moe.ops.DispatchPlan` of a call in this mode: dispatch path,
        dropless or not, capacity factor (see `tf_moe.ops.plan` for what
        "auto" picks).

        Raises:
            CustomCallUnavailableError (RuntimeError): dispatch="custom_call"
                and a library it needs is not built (says how to build it).
        """
        name = "capacity_factor" if training else "eval_capacity_factor"
        return plan_lib.resolve_plan(
            self.dispatch,
            getattr(self, name),
            token_choice=self.token_choice,
            rows=self.supports_rows,
            capacity_name=name,
            num_experts=self.experts.num_experts,
            per_shard=self.supports_rows,
            training=training,
        )

    @property
    def token_choice(self):
        """Whether the routing is token choice (see `Router.token_choice`)."""
        return True

    def build(self, input_shape):
        if len(input_shape) not in (2, 3):
            raise ValueError(
                "`inputs` must have rank 2 [batch, d] or 3 [batch, seq, d]. "
                f"Received: inputs.shape={tuple(input_shape)}"
            )
        self.feature_dim = input_shape[-1]
        if self.feature_dim is None:
            raise ValueError(
                "The last dimension of `inputs` must be known. "
                f"Received: inputs.shape={tuple(input_shape)}"
            )
        # Statistics sync on read, like Keras metrics: under tf.distribute each
        # replica writes its own copy (no cross-replica sync in the step) and
        # a read gives their mean. An on-write variable with an aggregation
        # makes TF sync the replicas inside `call`, between `add_loss` and the
        # step's loss, and Keras then optimizes the last replica's aux losses.
        self._stat_variables = {
            name: keras.Variable(
                initializer="zeros",
                shape=shape,
                dtype="float32",
                trainable=False,
                autocast=False,
                aggregation="mean",
                synchronization="on_read",
                name=name,
            )
            for name, shape in {**self.stat_shapes(), NONFINITE: ()}.items()
        }

    def stat_shapes(self):
        """dict name -> shape of every statistic `route_and_compute` returns."""
        raise NotImplementedError

    def route_and_compute(self, plan, groups, token_mask, training):
        """groups [G, S, d], token_mask <bool>[G, S] of the call's `plan` ->
        (outputs [G, S, d], stats dict incl. the weighted aux losses under
        their `loss_names`)."""
        raise NotImplementedError

    @property
    def loss_names(self):
        """Names of the auxiliary losses this layer adds."""
        raise NotImplementedError

    @property
    def active_expert_fraction(self):
        """Fraction of the expert parameters one token uses."""
        raise NotImplementedError

    def call(self, inputs, training=None):
        if len(inputs.shape) not in (2, 3) or inputs.shape[-1] != self.feature_dim:
            raise ValueError(
                f"`inputs` must have shape [batch, {self.feature_dim}] or "
                f"[batch, seq, {self.feature_dim}] (this layer was built for "
                f"d={self.feature_dim}). Received: inputs.shape={tuple(inputs.shape)}"
            )
        if not keras.backend.is_float_dtype(inputs.dtype):
            raise ValueError(
                "`inputs` must be floating point token representations (e.g. the "
                "output of an Embedding layer, not token ids). Received: "
                f"inputs.dtype={keras.backend.standardize_dtype(inputs.dtype)}"
            )
        tokens = ops.reshape(inputs, (-1, self.feature_dim))  # [T, d]
        if tokens.shape[0] == 0:  # an empty batch: nothing to route
            return ops.zeros_like(inputs)
        # A token with a NaN or inf is routed aside: it takes no slot, counts
        # in no loss or statistic, its output is NaN, and no other token's
        # output depends on it (0 * NaN in the one-hot matmuls would spread it
        # over its group).
        finite = ops.all(ops.isfinite(tokens), axis=-1)  # [T]
        tokens = ops.where(finite[:, None], tokens, ops.zeros_like(tokens))
        plan = self.plan(bool(training))
        groups, token_mask = plan.group(tokens, self.group_size)  # [G, S, d], [G, S]
        finite_groups, _ = plan.group(ops.cast(finite, "float32")[:, None], self.group_size)
        token_mask = ops.logical_and(token_mask, finite_groups[..., 0] > 0)
        outputs, stats = self.route_and_compute(plan, groups, token_mask, bool(training))
        outputs = plan.ungroup(outputs, ops.shape(tokens)[0])  # [T, d]
        outputs = ops.where(finite[:, None], outputs, ops.full_like(outputs, float("nan")))
        stats[NONFINITE] = 1.0 - ops.mean(ops.cast(finite, "float32"))
        aux_losses = [stats[name] for name in self.loss_names]
        if aux_losses:
            self.add_loss(ops.sum(ops.stack(aux_losses)))
        for name, variable in self._stat_variables.items():
            variable.assign(ops.cast(stats[name], "float32"))
        return ops.reshape(ops.cast(outputs, self.compute_dtype), ops.shape(inputs))

    @property
    def last_routing_stats(self):
        """dict name -> numpy value of the last call's routing statistics
        (see `tf_moe.metrics.routing_stats`); empty before the layer is built."""
        return {
            name: ops.convert_to_numpy(variable)
            for name, variable in getattr(self, "_stat_variables", {}).items()
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "expert_hidden_dim": self.expert_hidden_dim,
                "expert_activation": self.expert_activation,
                "expert_dropout": self.expert_dropout,
                "expert_use_bias": self.expert_use_bias,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "min_capacity": self.min_capacity,
                "group_size": self.group_size,
                "dispatch": self.dispatch,
                "expert_kernel_initializer": (
                    None
                    if self.expert_kernel_initializer is None
                    else keras.initializers.serialize(
                        keras.initializers.get(self.expert_kernel_initializer)
                    )
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(GroupedMoELayer):
    """Sparsely-gated Mixture-of-Experts feed-forward layer.

    Tokens are routed in groups of `group_size`; each expert takes at most
    C = ceil(capacity_factor * S * k / E) tokens per group (at least
    `min_capacity`), and overflowing choices are dropped: their output from
    that expert is 0, so wrap the layer in a residual connection.

    A capacity factor of None drops nothing. On the "custom_call" path (and
    "auto" where it resolves to it and the grouped-matmul library is built;
    see `plan` and `runs_dropless`) a token-choice router then runs dropless:
    no [E, G, C, d] buffers, the routed choices are sorted by expert into
    N = G * S * k rows and each expert's FFN is one matmul over its segment
    (`tf_moe.ops.dropless`). On "einsum"/"gather" (and with
    `ExpertChoiceRouter`, whose capacity is its routing rule) None means
    C = S: the same function, with E * S slots per group. The router's
    auxiliary losses are added with `add_loss`; the statistics of the last call
    are in `last_routing_stats` (see `tf_moe.metrics.RoutingStatsLogger` for
    `model.fit` logs).

    Args:
        num_experts: int >= 1, E.
        expert_hidden_dim: int >= 1, hidden width h of each expert.
        expert_activation: "relu" (default), "gelu", "silu", or the gated
            "reglu", "geglu", "swiglu".
        expert_dropout: float in [0, 1), dropout on expert hidden units.
        expert_use_bias: bool, default True.
        router: a `tf_moe.routing.Router`; default `TopKRouter(k=2)`. A router
            without `num_experts` is copied and bound to this layer's E.
        capacity_factor: float > 0 used in training, or None for no dropping
            (dropless on "custom_call", else C = S). Default 1.25.
        eval_capacity_factor: float > 0 or None used at inference. Default 2.0.
        min_capacity: int >= 1, default 4.
        group_size: int >= 1, tokens per routing group (S). Default 1024; a
            call with fewer (statically known) tokens routes them as one group.
        dispatch: "auto" (default: "einsum" on TPU, "gather" under a
            `keras.distribution`; elsewhere "custom_call" when its library is
            built, else "gather"; the table in `tf_moe.ops.plan` and the
            README), "einsum", "gather" or "custom_call". Every path computes
            the same function. "custom_call" without its library raises
            `RuntimeError` saying how to build it. Where "auto" cannot honour
            a None capacity factor with dropless rows, it warns and uses
            C = S buffers.
        expert_kernel_initializer: initializer for expert kernels, or None
            for per-expert fan-in truncated normal.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: [B, d] or [B, L, d].
        training: bool.

    Output shape: same as `inputs`.

    Example:
    >>> moe = MoE(num_experts=4, expert_hidden_dim=32, group_size=16)
    >>> y = moe(keras.random.normal((2, 8, 16)))
    >>> tuple(y.shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        num_experts,
        expert_hidden_dim,
        expert_activation="relu",
        expert_dropout=0.0,
        expert_use_bias=True,
        router=None,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        group_size=1024,
        dispatch="auto",
        expert_kernel_initializer=None,
        **kwargs,
    ):
        check_positive_int("num_experts", num_experts)
        super().__init__(
            num_experts,
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
        self.num_experts = num_experts
        self.router = bind_router(router, num_experts)

    def build(self, input_shape):
        super().build(input_shape)
        # A router passed in may already be built (e.g. shared, or from an
        # older config that kept its build_config); Experts is always new.
        if not self.router.built:
            self.router.build((None, None, self.feature_dim))
        self.experts.build((self.num_experts, None, None, self.feature_dim))

    def stat_shapes(self):
        shapes = {"expert_load": (self.num_experts,)}
        shapes.update({name: () for name in metrics.SCALAR_STATS + self.loss_names})
        return shapes

    @property
    def loss_names(self):
        return self.router.loss_names

    @property
    def active_expert_fraction(self):
        """Fraction of the expert parameters a token uses (training capacity)."""
        experts = self.router.experts_per_token(self.capacity_factor)
        return min(1.0, experts / self.num_experts)

    @property
    def token_choice(self):
        return self.router.token_choice

    def capacity(self, group_size, training):
        """Slots per expert per group for a group of `group_size` tokens."""
        return self.plan(training).capacity(
            group_size, self.num_experts, self.router.choices_per_token, self.min_capacity
        )

    def runs_dropless(self, training):
        """Whether a call in this mode runs dropless (`plan(training).dropless`):
        no capacity factor, a token-choice router, and the custom-call path
        with the grouped-matmul library ("custom_call", or "auto" where it
        resolves to it).

        Raises:
            RuntimeError: dispatch="custom_call" with a library missing (says
                how to build it).
        """
        return self.plan(training).dropless

    def route_and_compute(self, plan, groups, token_mask, training):
        capacity = plan.capacity(
            groups.shape[1], self.num_experts, self.router.choices_per_token,
            self.min_capacity,
        )
        routing = self.router.route(groups, capacity, token_mask, training)
        outputs = plan.run(groups, routing, self.experts, training)
        return outputs, metrics.routing_stats(routing)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "router": _unbuilt(keras.saving.serialize_keras_object(self.router)),
            }
        )
        return config
