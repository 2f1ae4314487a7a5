"""Token dispatch and combine in pure `keras.ops`: the one-hot einsum path and
the gather path. Both compute the same function of a `Routing`:

    dispatch: expert_inputs[e, g, c] = x[g, s] for the routed choice (g, s, j)
              with expert_index = e and position = c; 0 for empty slots.
    combine:  y[g, s] = sum_j combine_weight[g, s, j] *
              expert_outputs[expert_index[g, s, j], g, position[g, s, j]].

`einsum` builds one-hot dispatch/combine tensors [G, S, E, C] (GShard, Mesh
TensorFlow): static shapes, TPU friendly, O(S * E * C * d) work. `gather`
moves rows by index: O(S * k * d) work plus a scatter of slot owners.
`custom_call` (registered in `DISPATCHERS`, implemented in
`tf_moe.ops.custom_call`) runs the same function as XLA custom calls into the
Bazel-built C++/CUDA library.

A `Routing` in slot-major form (expert choice, `Routing.from_slots`) is
dispatched by its slot -> token index: O(E * C * d) work per group on every
path (the einsum path's one-hot is [G, E, C, S]).

Owns: dispatch/combine math. Does not own: routing decisions
(`tf_moe.routing`), the choice of a path (`tf_moe.ops.plan`).

Shape letters: G groups, S tokens per group, d model dim, E experts,
C capacity, k choices per token.
"""

import keras
from keras import ops

from tf_moe.ops import custom_call

DISPATCH_METHODS = ("auto", "einsum", "gather", "custom_call")


def _combine_tensor(routing, weighted):
    """<float32>[G, S, E, C]: one-hot (or weighted) routing tensor."""
    # Shape: [G, S, k, E]
    expert = ops.one_hot(routing.expert_index, routing.num_experts)
    scale = ops.cast(routing.dispatch_mask, expert.dtype)  # [G, S, k]
    if weighted:
        # Masked again so unrouted choices get no gradient either.
        scale = scale * routing.combine_weight
    # Shape: [G, S, k, C]; dropped choices (mask false) contribute nothing.
    slot = ops.one_hot(
        ops.where(routing.dispatch_mask, routing.position, 0), routing.capacity
    )
    return ops.einsum("gske,gsk,gskc->gsec", expert, scale, slot)


def _slot_onehot(routing, dtype):
    """[G, E, C, S] one-hot of each slot's token (all 0 for empty slots)."""
    return ops.one_hot(routing.slot_token, routing.token_mask.shape[-1], dtype=dtype)


def einsum_dispatch(x, routing):
    """Dispatch with a one-hot tensor. x: [G, S, d] -> [E, G, C, d]."""
    if routing.slot_major:
        return ops.einsum("gecs,gsd->egcd", _slot_onehot(routing, x.dtype), x)
    dispatch = ops.cast(_combine_tensor(routing, weighted=False), x.dtype)
    return ops.einsum("gsec,gsd->egcd", dispatch, x)


def einsum_combine(expert_outputs, routing):
    """Combine with a weighted one-hot tensor. [E, G, C, d] -> [G, S, d]."""
    dtype = expert_outputs.dtype
    if routing.slot_major:
        weight = ops.cast(routing.slot_weight, dtype)  # [G, E, C]
        return ops.einsum(
            "gecs,gec,egcd->gsd", _slot_onehot(routing, dtype), weight, expert_outputs
        )
    combine = ops.cast(_combine_tensor(routing, weighted=True), dtype)
    return ops.einsum("gsec,egcd->gsd", combine, expert_outputs)


def _flat_slot(routing):
    """<int32>[G, S, k] index of each choice's slot in a [G * E * C] buffer;
    G * E * C (one past the end) for choices that are not routed."""
    num_groups = ops.shape(routing.expert_index)[0]
    slots_per_group = routing.num_experts * routing.capacity
    group = ops.arange(num_groups, dtype="int32")[:, None, None]  # [G, 1, 1]
    slot = (
        group * slots_per_group
        + routing.expert_index * routing.capacity
        + routing.position
    )
    return ops.where(routing.dispatch_mask, slot, num_groups * slots_per_group)


def _scatter_to_slots(routing, values):
    """[G * E * C] buffer holding `values` [G, S, k] of routed choices at their
    slots, 0 in empty slots."""
    num_groups = ops.shape(routing.expert_index)[0]
    num_slots = num_groups * routing.num_experts * routing.capacity
    values = ops.where(routing.dispatch_mask, values, ops.zeros_like(values))
    # Routed choices own distinct slots; the rest all land in one extra slot
    # at the end (sliced off), so the scatter-add never mixes two choices.
    return ops.scatter(
        ops.reshape(_flat_slot(routing), (-1, 1)),
        ops.reshape(values, (-1,)),
        (num_slots + 1,),
    )[:num_slots]


def _to_expert_major(flat_slots, routing):
    """[G * E * C] -> [E, G, C]."""
    slots = ops.reshape(flat_slots, (-1, routing.num_experts, routing.capacity))
    return ops.transpose(slots, (1, 0, 2))


def slot_owner(routing):
    """<int32>[G * E * C] flat token index (g * S + s) filling each slot; G * S
    for empty slots."""
    num_groups, group_size, _ = ops.shape(routing.expert_index)
    token = ops.arange(num_groups * group_size, dtype="int32")
    token = ops.reshape(token, (num_groups, group_size, 1))  # [G, S, 1]
    token = token + ops.zeros_like(routing.expert_index)  # [G, S, k]
    owner_plus_one = _scatter_to_slots(routing, token + 1)
    return ops.where(owner_plus_one > 0, owner_plus_one - 1, num_groups * group_size)


def slot_mask(routing):
    """<bool>[E, G, C]: slots that hold a token."""
    filled = _scatter_to_slots(routing, ops.ones_like(routing.expert_index)) > 0
    return _to_expert_major(filled, routing)


def slot_weight(routing):
    """<float32>[E, G, C]: combine weight of the choice in each slot (0 if empty)."""
    return _to_expert_major(_scatter_to_slots(routing, routing.combine_weight), routing)


def take_rows(rows, index):
    """rows [N, d], index <int32>[...] -> [..., d].

    On TensorFlow the gradient is an explicit segment sum: TF's own gather
    gradient, next to a top-k router's gradient, aborts XLA
    (`literal.cc Check failed: subshape->dimensions(dim_index) >= size`)
    under `jit_compile=True` when k > 1 (TF 2.21).
    """
    if keras.backend.backend() != "tensorflow":
        return ops.take(rows, index, axis=0)
    num_rows = rows.shape[0] if rows.shape[0] is not None else ops.shape(rows)[0]

    @ops.custom_gradient
    def take(rows):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            flat = ops.reshape(upstream, (-1, upstream.shape[-1]))
            return ops.segment_sum(flat, ops.reshape(index, (-1,)), num_rows)

        return ops.take(rows, index, axis=0), grad

    return take(rows)


def _slot_rows(routing):
    """<int32>[G * E * C] flat token index g * S + s of each slot (g-major);
    G * S for empty slots."""
    num_groups = ops.shape(routing.slot_token)[0]
    group_size = routing.token_mask.shape[-1]
    group = ops.arange(num_groups, dtype="int32")[:, None, None]  # [G, 1, 1]
    rows = ops.where(
        routing.slot_token < group_size,
        group * group_size + routing.slot_token,
        num_groups * group_size,
    )
    return ops.reshape(rows, (-1,))


def gather_dispatch(x, routing):
    """Dispatch by gathering token rows. x: [G, S, d] -> [E, G, C, d].

    Both views gather E * C rows per group: by `slot_token` (slot-major) or by
    the slot owners scattered from the choices (token-major)."""
    d = x.shape[-1]
    # Shape: [G * S + 1, d]; the last row is zeros for empty slots.
    rows = ops.concatenate([ops.reshape(x, (-1, d)), ops.zeros((1, d), x.dtype)], 0)
    if routing.slot_major:
        gathered = take_rows(rows, _slot_rows(routing))  # [G * E * C, d]
    else:
        gathered = take_rows(rows, slot_owner(routing))  # [G * E * C, d]
    gathered = ops.reshape(gathered, (-1, routing.num_experts, routing.capacity, d))
    return ops.transpose(gathered, (1, 0, 2, 3))  # [E, G, C, d]


def gather_combine(expert_outputs, routing):
    """Combine by gathering slot rows. [E, G, C, d] -> [G, S, d].

    Token-major: each token gathers its k slots. Slot-major: each slot's
    weighted row is summed into its token (a segment sum over E * C rows per
    group, not a gather of S * E)."""
    d = expert_outputs.shape[-1]
    # Shape: [G * E * C, d], g-major like the slots.
    rows = ops.reshape(ops.transpose(expert_outputs, (1, 0, 2, 3)), (-1, d))
    if routing.slot_major:
        num_groups = ops.shape(routing.slot_token)[0]
        group_size = routing.token_mask.shape[-1]
        weight = ops.cast(ops.reshape(routing.slot_weight, (-1, 1)), rows.dtype)
        # Segment G * S collects the empty slots and is sliced off.
        y = ops.segment_sum(rows * weight, _slot_rows(routing), num_groups * group_size + 1)
        return ops.reshape(y[:-1], (-1, group_size, d))
    rows = ops.concatenate([rows, ops.zeros((1, d), rows.dtype)], axis=0)
    gathered = take_rows(rows, _flat_slot(routing))  # [G, S, k, d]
    weight = ops.cast(routing.combine_weight, rows.dtype)  # [G, S, k]
    return ops.einsum("gskd,gsk->gsd", gathered, weight)


DISPATCHERS = {
    "einsum": (einsum_dispatch, einsum_combine),
    "gather": (gather_dispatch, gather_combine),
    "custom_call": (custom_call.custom_call_dispatch, custom_call.custom_call_combine),
}
