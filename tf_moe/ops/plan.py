"""The one decision of an MoE layer call: how its tokens reach the experts.

`resolve_plan` takes what the user asked for (`dispatch`, the capacity factor
of this call), what the router is (token or expert choice), whether the
layer can run on expert-sorted rows, and where the call runs (backend,
device platform, active `keras.distribution`), and returns a `DispatchPlan`:
the dispatch path, dropless or capacity buffers, the capacity factor, and the
implementation of every step. The layer calls it once per call and hands the
plan its tokens; nothing below it decides again.

What "auto" picks (a None capacity factor is a token-choice layer's request
for dropless):

| where                      | path        | capacity_factor=None           |
| -------------------------- | ----------- | ------------------------------ |
| CPU / CUDA GPU, library    | custom_call | dropless rows (grouped matmul) |
| CPU / GPU, no library      | gather      | C = S buffers, with a warning  |
| TPU                        | einsum      | C = S buffers, with a warning  |
| `ExpertParallel` mesh      | as above    | as above, expert-parallel      |
| other `keras.distribution` | gather      | C = S buffers, with a warning  |
| `portable()`; TF inference | gather      | C = S buffers (same function)  |
|   traced without XLA       |             |                                |

On an `ExpertParallel` mesh (`tf_moe.sharding`) einsum and gather run as one
SPMD program with sharding constraints, custom_call and dropless per device
(`jax.shard_map`) with all-to-alls over the "expert" axis.

An explicit `dispatch` is honoured or raises (`custom_call` without its
library says how to build it); with "einsum"/"gather" a None factor means
C = S buffers, as documented. Expert choice's capacity is its routing rule:
None there always means C = S (every expert may take every token).

Owns: the decision (`resolve_plan`) and the plan's execution (`DispatchPlan`:
capacity, dispatch -> experts -> combine). Does not own: the dispatch math
(`dispatch.py`, `custom_call.py`, `dropless.py`), expert math
(`tf_moe.layers.Experts`), routing.

Shape letters: G groups, S group size, d model dim, E experts, C capacity.
"""

import contextlib
import dataclasses
import functools
import warnings

import keras
from keras import ops

from tf_moe import sharding
from tf_moe._validation import check_choice
from tf_moe.ops import custom_call, dropless, grouped_matmul
from tf_moe.ops.dispatch import DISPATCH_METHODS, DISPATCHERS
from tf_moe.ops.library import jax_platform
from tf_moe.routing import expert_capacity


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """How one MoE layer call moves its tokens (see `resolve_plan`).

    Attributes:
        path: "einsum", "gather" or "custom_call": the dispatch/combine of
            capacity buffers [E, G, C, d].
        dropless: the experts run on expert-sorted rows [N, d] instead, by
            grouped matmuls; no token is dropped.
        capacity_factor: the capacity factor of this call (None: no token is
            dropped; C = S when not dropless).
        grouped_matmul: implementation of the rows' grouped matmul (dropless).
        row_kernels: rows move through the custom-call dispatch/combine
            kernels (dropless, where N is static).
        reason: why "auto" chose this, in words.
        mesh: a `tf_moe.sharding.MeshExperts` when the call runs
            expert-parallel (an `ExpertParallel` distribution is active), else
            None.
    """

    path: str
    dropless: bool
    capacity_factor: object
    grouped_matmul: str = None
    row_kernels: bool = False
    reason: str = ""
    mesh: object = None

    @property
    def per_shard(self):
        """Whether the call runs as a per-device program (custom calls are
        opaque to XLA's SPMD partitioner) rather than one SPMD program."""
        return self.mesh is not None and (self.dropless or self.path == "custom_call")

    def capacity(self, group_size, num_experts, choices_per_token, min_capacity):
        """Slots per expert per group, C (S when nothing may be dropped)."""
        return expert_capacity(
            group_size, num_experts, self.capacity_factor, choices_per_token, min_capacity
        )

    def group(self, tokens, group_size):
        """tokens [T, d] -> (groups [G, S, d], token_mask <bool>[G, S]): groups
        of `group_size` (or of all T tokens when fewer, statically), the last
        padded; on a mesh, per data shard (groups never straddle devices)."""
        if self.mesh is not None:
            return self.mesh.group(tokens, group_size)
        num_tokens = tokens.shape[0]
        if isinstance(num_tokens, int):  # not unknown, not symbolic (jax.export)
            group_size = min(group_size, num_tokens)
        return group_tokens(tokens, group_size)

    def ungroup(self, outputs, num_tokens):
        """[G, S, d] from `group` -> [T, d]."""
        if self.mesh is not None:
            return self.mesh.ungroup(outputs, num_tokens)
        return ops.reshape(outputs, (-1, outputs.shape[-1]))[:num_tokens]

    def to_experts(self, buffers):
        """[E, G, C, d] from where their groups are to the experts' devices
        (no-op off a mesh)."""
        return buffers if self.mesh is None else self.mesh.to_experts(buffers)

    def to_groups(self, buffers):
        """The inverse of `to_experts`."""
        return buffers if self.mesh is None else self.mesh.to_groups(buffers)

    def constrain_groups(self, x):
        """[G, ...] laid out on the mesh's data axes (no-op off one)."""
        return x if self.mesh is None else self.mesh.constrain_groups(x)

    def dispatch(self, x, routing):
        """x [G, S, d] -> capacity buffers [E, G, C, d]."""
        return DISPATCHERS[self.path][0](x, routing)

    def combine(self, expert_outputs, routing):
        """Capacity buffers [E, G, C, d] -> [G, S, d]."""
        return DISPATCHERS[self.path][1](expert_outputs, routing)

    def run(self, groups, routing, experts, training=False):
        """groups [G, S, d] -> [G, S, d]: dispatch, `experts` (a
        `tf_moe.layers.Experts`), combine; per device on a mesh where the
        path needs it (`per_shard`)."""
        if self.per_shard:
            params = {name: weight.value for name, weight in experts.params.items()}
            seed = ()
            if training and experts.dropout > 0:
                seed = (experts.dropout_layer.seed_generator.next(),)
            local = functools.partial(self._run_local, experts=experts, training=training)
            return self.mesh.per_shard(local, groups, routing, params, seed)
        if not self.dropless:
            # On a mesh: one SPMD program; XLA turns the change of layout
            # between groups (data axes) and buffers (experts on "expert")
            # into all-to-alls.
            buffers = self.to_experts(self.dispatch(groups, routing))
            outputs = self.to_groups(experts(buffers, training=training))
            return self.constrain_groups(self.combine(outputs, routing))
        layout, kernels = self._layout(routing)
        rows = dropless.dispatch_rows(groups, routing, layout, kernels)  # [N, d]
        out_rows = experts.on_rows(rows, layout, training, self.grouped_matmul)
        return dropless.combine_rows(out_rows, routing, layout, kernels)

    def _layout(self, routing):
        layout = dropless.dropless_layout(routing)
        return layout, self.row_kernels and isinstance(layout.num_rows, int)

    def _run_local(self, groups, routing, params, *seed, experts, training):
        """One device's program (inside `MeshExperts.per_shard`): its groups,
        its routing, its experts' weights."""
        mesh = self.mesh
        kwargs = dict(partial_sum=mesh.sum_over_model)
        if seed:
            kwargs["dropout_seed"] = mesh.device_seed(seed[0])
        if not self.dropless:
            buffers = DISPATCHERS[self.path][0](groups, routing)  # [E, G_l, C, d]
            buffers = mesh.all_to_all_experts(buffers)  # [E / X, X * G_l, C, d]
            outputs = experts.on_buffers(buffers, training, params, **kwargs)
            outputs = mesh.all_to_all_groups(outputs)  # [E, G_l, C, d]
            return DISPATCHERS[self.path][1](outputs, routing)
        layout, kernels = self._layout(routing)
        rows = dropless.dispatch_rows(groups, routing, layout, kernels)  # [N, d]
        received, sizes, back = mesh.exchange_rows(rows, layout.group_sizes)
        received_layout = dropless.segment_layout(sizes, received.shape[0])
        out = experts.on_rows(
            received, received_layout, training, self.grouped_matmul, params, **kwargs
        )
        return dropless.combine_rows(back(out), routing, layout, kernels)


def group_tokens(tokens, group_size):
    """Splits tokens into groups, padding the last one.

    Args:
        tokens: [T, d] (T static, unknown, or symbolic as in `jax.export`).
        group_size: int, S.

    Returns:
        (groups [G, S, d], token_mask <bool>[G, S]) with G = ceil(T / S).
    """
    num_tokens = ops.shape(tokens)[0]
    # G and the padding written so that a symbolic T gives G * S rows exactly.
    num_groups = (num_tokens + group_size - 1) // group_size
    padding = num_groups * group_size - num_tokens
    padded = ops.pad(tokens, [[0, padding], [0, 0]])
    groups = ops.reshape(padded, (num_groups, group_size, tokens.shape[-1]))
    token_mask = ops.arange(num_groups * group_size) < num_tokens
    return groups, ops.reshape(token_mask, (num_groups, group_size))


@functools.lru_cache(maxsize=None)
def _platform(backend):
    """"cpu", "gpu" or "tpu": where the backend's default device is."""
    if backend == "jax":
        return jax_platform()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return "tpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return "cpu"


def _warn_buffers(setting, reason):
    warnings.warn(
        f"{setting}: no token is dropped, but {reason}, so this layer uses "
        "capacity buffers with C = S (E * S slots per group). Pass a capacity "
        "factor to bound them.",
        RuntimeWarning,
        stacklevel=4,
    )


_PORTABLE = {"depth": 0}


@contextlib.contextmanager
def portable():
    """Layers called within plan only programs of the framework's own ops:
    "auto" is gather (einsum on TPU) and a None capacity factor means C = S
    buffers (the same function as dropless), so the traced program can be
    exported and served without tf_moe's libraries (`jax.export`,
    `tf.saved_model`). An explicit dispatch="custom_call" raises.

    On TensorFlow this is also the rule, without the context, for inference
    calls traced into a graph that XLA does not compile (what `model.export()`
    traces), so that its SavedModel loads in plain TensorFlow.
    """
    _PORTABLE["depth"] += 1
    try:
        yield
    finally:
        _PORTABLE["depth"] -= 1


def _tf_inference_graph(training):
    """An inference call traced into a TF graph that XLA will not compile."""
    if training or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return not control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def resolve_plan(dispatch="auto", capacity_factor=1.25, token_choice=True, rows=True,
                 capacity_name="capacity_factor", num_experts=None, per_shard=True,
                 training=None):
    """The `DispatchPlan` of one layer call.

    Args:
        dispatch: the layer's `dispatch` argument: "auto", "einsum", "gather"
            or "custom_call".
        capacity_factor: the capacity factor of this call (training or
            evaluation), or None.
        token_choice: whether the router is token choice (`Router.token_choice`);
            only token choice can run dropless.
        rows: whether the layer can run its experts on expert-sorted rows
            (False for `HierarchicalMoE`).
        capacity_name: the argument that set `capacity_factor`, for messages.
        num_experts: the layer's E; with it, an active `ExpertParallel`
            distribution makes the call expert-parallel (`plan.mesh`).
        per_shard: whether the layer can run its dispatch as a per-device
            program (False for `HierarchicalMoE`: SPMD paths only on a mesh).
        training: the call's mode (None: unknown), for the portable rule of
            TF inference graphs (see `portable`).

    Raises:
        ValueError: an unknown `dispatch`; E not divisible by the mesh's
            "expert" axis; "custom_call" on a mesh for a layer without a
            per-device program.
        CustomCallUnavailableError (a RuntimeError): dispatch="custom_call"
            and a library it needs is missing; the message says how to build it.
    """
    check_choice("dispatch", dispatch, DISPATCH_METHODS)
    mesh = None if num_experts is None else sharding.mesh_experts(num_experts)
    wants_rows = capacity_factor is None and token_choice and rows
    setting = f"{capacity_name}=None with dispatch={dispatch!r}"
    if _PORTABLE["depth"] and dispatch == "custom_call":
        raise ValueError(
            "dispatch='custom_call' cannot be exported as a portable program (its "
            "custom calls need tf_moe's libraries where it runs). Use "
            "dispatch='auto' (or 'gather'/'einsum') for export. Received: "
            "dispatch='custom_call' inside tf_moe.ops.plan.portable()"
        )
    if dispatch == "auto" and (_PORTABLE["depth"] or _tf_inference_graph(training)):
        path = "einsum" if _platform(keras.backend.backend()) == "tpu" else "gather"
        return DispatchPlan(path, False, capacity_factor, mesh=mesh,
                            reason="auto: a portable program (framework ops only)")
    if dispatch == "custom_call":
        if mesh is not None and not per_shard:
            raise ValueError(
                "dispatch='custom_call' runs expert-parallel only per device, which "
                "this layer does not support; use 'einsum' or 'gather' (SPMD). "
                "Received: dispatch='custom_call' under an ExpertParallel distribution"
            )
        custom_call.require_available()
        if wants_rows:
            grouped_matmul.require_available()
            return _dropless("dispatch='custom_call'", mesh)
        return DispatchPlan("custom_call", False, capacity_factor, reason="requested", mesh=mesh)
    if dispatch != "auto":
        return DispatchPlan(dispatch, False, capacity_factor, reason="requested", mesh=mesh)

    platform = _platform(keras.backend.backend())
    if platform == "tpu":
        path, why = "einsum", "on TPU (static one-hot matmuls suit the MXU)"
    elif mesh is None and keras.distribution.distribution() is not None:
        # XLA SPMD cannot partition an opaque custom call.
        path, why = "gather", "under a keras.distribution other than ExpertParallel"
    elif mesh is not None and not per_shard:
        path, why = "gather", "expert-parallel, as one SPMD program"
    elif custom_call.is_available():
        path, why = "custom_call", f"on {platform.upper()} with the custom-call library"
    else:
        path, why = "gather", f"on {platform.upper()} without the custom-call library"
    if mesh is not None:
        why += f" (expert-parallel on {mesh.num_data_shards} data shards)"
    if wants_rows:
        if path == "custom_call" and grouped_matmul.is_available():
            return _dropless(f"auto: {why}", mesh)
        missing = (
            "the grouped-matmul library is not built" if path == "custom_call"
            else f"'auto' runs {path} {why}"
        )
        _warn_buffers(setting, missing)
    return DispatchPlan(path, False, capacity_factor, reason=f"auto: {why}", mesh=mesh)


def _dropless(reason, mesh):
    return DispatchPlan(
        "custom_call",
        True,
        None,
        grouped_matmul="custom_call",
        row_kernels=True,
        reason=reason + "; dropless rows",
        mesh=mesh,
    )
