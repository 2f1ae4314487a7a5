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

| where                     | path        | capacity_factor=None            |
| ------------------------- | ----------- | ------------------------------- |
| CPU / CUDA GPU, library   | custom_call | dropless rows (grouped matmul)  |
| CPU / GPU, no library     | gather      | C = S buffers, with a warning   |
| TPU                       | einsum      | C = S buffers, with a warning   |
| under `keras.distribution`| gather      | C = S buffers, with a warning   |

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

import dataclasses
import functools
import warnings

import keras

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
    """

    path: str
    dropless: bool
    capacity_factor: object
    grouped_matmul: str = None
    row_kernels: bool = False
    reason: str = ""

    def capacity(self, group_size, num_experts, choices_per_token, min_capacity):
        """Slots per expert per group, C (S when nothing may be dropped)."""
        return expert_capacity(
            group_size, num_experts, self.capacity_factor, choices_per_token, min_capacity
        )

    def dispatch(self, x, routing):
        """x [G, S, d] -> capacity buffers [E, G, C, d]."""
        return DISPATCHERS[self.path][0](x, routing)

    def combine(self, expert_outputs, routing):
        """Capacity buffers [E, G, C, d] -> [G, S, d]."""
        return DISPATCHERS[self.path][1](expert_outputs, routing)

    def run(self, groups, routing, experts, training=False):
        """groups [G, S, d] -> [G, S, d]: dispatch, `experts` (a
        `tf_moe.layers.Experts`), combine."""
        if not self.dropless:
            return self.combine(experts(self.dispatch(groups, routing), training=training),
                                routing)
        layout = dropless.dropless_layout(routing)
        kernels = self.row_kernels and isinstance(layout.num_rows, int)
        rows = dropless.dispatch_rows(groups, routing, layout, kernels)  # [N, d]
        out_rows = experts.on_rows(rows, layout, training, self.grouped_matmul)
        return dropless.combine_rows(out_rows, routing, layout, kernels)


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


def resolve_plan(dispatch="auto", capacity_factor=1.25, token_choice=True, rows=True,
                 capacity_name="capacity_factor"):
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

    Raises:
        ValueError: an unknown `dispatch`.
        CustomCallUnavailableError (a RuntimeError): dispatch="custom_call"
            and a library it needs is missing; the message says how to build it.
    """
    check_choice("dispatch", dispatch, DISPATCH_METHODS)
    wants_rows = capacity_factor is None and token_choice and rows
    setting = f"{capacity_name}=None with dispatch={dispatch!r}"
    if dispatch == "custom_call":
        custom_call.require_available()
        if wants_rows:
            grouped_matmul.require_available()
            return _dropless("dispatch='custom_call'")
        return DispatchPlan("custom_call", False, capacity_factor, reason="requested")
    if dispatch != "auto":
        return DispatchPlan(dispatch, False, capacity_factor, reason="requested")

    platform = _platform(keras.backend.backend())
    if platform == "tpu":
        path, why = "einsum", "on TPU (static one-hot matmuls suit the MXU)"
    elif keras.distribution.distribution() is not None:
        # XLA SPMD cannot partition an opaque custom call.
        path, why = "gather", "under a keras.distribution"
    elif custom_call.is_available():
        path, why = "custom_call", f"on {platform.upper()} with the custom-call library"
    else:
        path, why = "gather", f"on {platform.upper()} without the custom-call library"
    if wants_rows:
        if path == "custom_call" and grouped_matmul.is_available():
            return _dropless(f"auto: {why}")
        missing = (
            "the grouped-matmul library is not built" if path == "custom_call"
            else f"'auto' runs {path} {why}"
        )
        _warn_buffers(setting, missing)
    return DispatchPlan(path, False, capacity_factor, reason=f"auto: {why}")


def _dropless(reason):
    return DispatchPlan(
        "custom_call",
        True,
        None,
        grouped_matmul="custom_call",
        row_kernels=True,
        reason=reason + "; dropless rows",
    )
