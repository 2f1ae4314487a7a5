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

from keras import ops

from tf_moe._groups import scatter_add_per_group, take_per_group
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
    return ops.one_hot(routing.slot_token, routing.expert_index.shape[1], dtype=dtype)


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


def _slot_index(routing):
    """<int32>[G, S, k] each choice's slot e * C + c within its group's
    [E * C] slots; E * C (one past the end) for choices that are not routed."""
    num_slots = routing.num_experts * routing.capacity
    slot = routing.expert_index * routing.capacity + routing.position
    return ops.where(routing.dispatch_mask, slot, num_slots)


def _scatter_to_slots(routing, values):
    """[G, E * C]: `values` [G, S, k] of routed choices at their slots, 0 in
    empty slots."""
    num_slots = routing.num_experts * routing.capacity
    values = ops.where(routing.dispatch_mask, values, ops.zeros_like(values))
    k = values.shape[-1]
    group_size = routing.expert_index.shape[1]
    # Routed choices own distinct slots; the rest all land in one extra slot
    # at the end (sliced off), so the scatter-add never mixes two choices.
    slots = scatter_add_per_group(
        ops.reshape(values, (-1, group_size * k)),
        ops.reshape(_slot_index(routing), (-1, group_size * k)),
        num_slots + 1,
    )
    return slots[:, :num_slots]


def _to_expert_major(slots, routing):
    """[G, E * C] -> [E, G, C]."""
    slots = ops.reshape(slots, (-1, routing.num_experts, routing.capacity))
    return ops.transpose(slots, (1, 0, 2))


def slot_owner(routing):
    """<int32>[G, E * C] token s (in its group) filling each slot e * C + c;
    S for empty slots."""
    group_size = routing.expert_index.shape[1]
    if routing.slot_major:
        return ops.reshape(routing.slot_token, (-1, routing.num_experts * routing.capacity))
    token = ops.arange(group_size, dtype="int32")[None, :, None]  # [1, S, 1]
    token = token + ops.zeros_like(routing.expert_index)  # [G, S, k]
    owner_plus_one = _scatter_to_slots(routing, token + 1)
    return ops.where(owner_plus_one > 0, owner_plus_one - 1, group_size)


def slot_mask(routing):
    """<bool>[E, G, C]: slots that hold a token."""
    return _to_expert_major(slot_owner(routing) < routing.expert_index.shape[1], routing)


def slot_weight(routing):
    """<float32>[E, G, C]: combine weight of the choice in each slot (0 if empty)."""
    if routing.slot_major:
        return ops.transpose(routing.slot_weight, (1, 0, 2))
    return _to_expert_major(_scatter_to_slots(routing, routing.combine_weight), routing)


def _with_zero_row(rows):
    """[G, R, d] -> [G, R + 1, d], row R of every group zeros."""
    zeros = ops.zeros_like(rows[:, :1])
    return ops.concatenate([rows, zeros], axis=1)


def gather_dispatch(x, routing):
    """Dispatch by gathering token rows. x: [G, S, d] -> [E, G, C, d].

    Each group gathers its E * C slots' rows (by `slot_token` for a
    slot-major routing, else by the slot owners scattered from the
    choices); an empty slot gathers the zero row S."""
    d = x.shape[-1]
    gathered = take_per_group(_with_zero_row(x), slot_owner(routing))  # [G, E * C, d]
    gathered = ops.reshape(gathered, (-1, routing.num_experts, routing.capacity, d))
    return ops.transpose(gathered, (1, 0, 2, 3))  # [E, G, C, d]


def gather_combine(expert_outputs, routing):
    """Combine by gathering slot rows. [E, G, C, d] -> [G, S, d].

    Token-major: each token gathers its k slots. Slot-major: each slot's
    weighted row is summed into its token (a scatter-add of E * C rows per
    group, not a gather of S * E)."""
    num_experts, _, capacity, d = expert_outputs.shape
    # Shape: [G, E * C, d]
    rows = ops.reshape(ops.transpose(expert_outputs, (1, 0, 2, 3)), (-1, num_experts * capacity, d))
    if routing.slot_major:
        group_size = routing.expert_index.shape[1]
        weight = ops.reshape(routing.slot_weight, (-1, num_experts * capacity, 1))
        y = scatter_add_per_group(
            rows * ops.cast(weight, rows.dtype), slot_owner(routing), group_size + 1
        )  # [G, S + 1, d]; row S collects the empty slots
        return y[:, :group_size]
    group_size, k = routing.expert_index.shape[1:]
    slots = ops.reshape(_slot_index(routing), (-1, group_size * k))
    gathered = take_per_group(_with_zero_row(rows), slots)  # [G, S * k, d]
    gathered = ops.reshape(gathered, (-1, group_size, k, d))
    weight = ops.cast(routing.combine_weight, rows.dtype)  # [G, S, k]
    return ops.einsum("gskd,gsk->gsd", gathered, weight)


DISPATCHERS = {
    "einsum": (einsum_dispatch, einsum_combine),
    "gather": (gather_dispatch, gather_combine),
    "custom_call": (custom_call.custom_call_dispatch, custom_call.custom_call_combine),
}
