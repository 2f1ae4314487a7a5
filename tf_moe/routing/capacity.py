"""Slot assignment for token-choice routing: positions within expert capacity.

Choices are placed in order of choice rank first (all first choices before any
second choice, GShard), then token priority within a rank: token order, or
descending priority for batch-prioritized routing (Riquelme et al. 2021).

Shape letters: G groups, S tokens per group, k choices, E experts.
"""

from keras import ops


def assign_positions(expert_index, requested_mask, num_experts, priority=None):
    """Slot of every requested choice within its expert's buffer.

    Args:
        expert_index: <int32>[G, S, k] expert of each choice.
        requested_mask: <bool>[G, S, k] choices to place; others take no slot.
        num_experts: int, E.
        priority: <float32>[G, S] or None. When given, higher-priority tokens
            get earlier slots within each choice rank.

    Returns:
        <int32>[G, S, k] 0-based position in the expert buffer (counting only
        requested choices); -1 where not requested. Positions >= capacity mean
        the choice overflows.
    """
    _, group_size, k = expert_index.shape
    # Shape: [G, S, k, E]
    onehot = ops.one_hot(expert_index, num_experts, dtype="int32")
    onehot = onehot * ops.cast(requested_mask, "int32")[..., None]
    if priority is not None:
        order = ops.argsort(-priority, axis=1)  # [G, S]
        onehot = ops.take_along_axis(onehot, order[:, :, None, None], axis=1)
    # Shape: [G, k * S, E], choice rank major.
    ranked = ops.reshape(
        ops.transpose(onehot, (0, 2, 1, 3)), (-1, k * group_size, num_experts)
    )
    # Shape: [G, k * S]; running count of earlier choices for the same expert.
    position = ops.sum((ops.cumsum(ranked, axis=1) - 1) * ranked, axis=-1)
    # Shape: [G, S, k]
    position = ops.transpose(ops.reshape(position, (-1, k, group_size)), (0, 2, 1))
    if priority is not None:
        unsort = ops.argsort(order, axis=1)  # [G, S]
        position = ops.take_along_axis(position, unsort[:, :, None], axis=1)
    return ops.where(requested_mask, position, -1)


def apply_capacity(position, requested_mask, capacity):
    """<bool>[G, S, k]: requested choices that fit in `capacity` slots."""
    return ops.logical_and(requested_mask, position < capacity)
