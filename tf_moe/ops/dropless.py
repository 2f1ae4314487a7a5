"""Dropless dispatch (`capacity_factor=None`): expert-sorted rows and grouped
matmuls instead of [E, G, C, d] capacity buffers.

Every routed choice gets one row of a buffer [N, d] sorted by expert; each
expert's segment is padded to a multiple of `tile` rows (1 = no padding, what
`MoE` uses; larger tiles serve tiled kernels and the "reference" grouped
matmul), so no choice is ever dropped and no expert computes on more than
ceil(count / tile) * tile rows:

    layout:   row[g, s, j] = start[e] + (number of earlier routed choices of
              expert e, in flat (g, s, j) order), e = expert_index[g, s, j];
              start[e] = sum_{e' < e} round_up(count[e'], tile).
    dispatch: rows[row[g, s, j]] = x[g, s]; 0 for padding rows.
    experts:  out_rows[r] = FFN_{expert(r)}(rows[r]) by grouped matmuls.
    combine:  y[g, s] = sum_j combine_weight[g, s, j] * out_rows[row[g, s, j]].

N is static: round_up(G * S * k + E * (tile - 1), tile) covers any routing.

The layout is pure `keras.ops`. Rows move by `keras.ops` gathers or by the
custom-call dispatch/combine kernels (`dispatch_rows(..., kernels=True)`,
which `tf_moe.ops.plan` picks with the custom-call grouped matmul and a static
N); the expert FFNs run on the rows in `tf_moe.layers.Experts.on_rows`. See
docs/custom_calls.md, "Dropless mode".

Owns: the dropless layout, moving tokens to rows and back.
Does not own: routing (`tf_moe.routing`; a dropless MoE routes with capacity
C = S so that no choice overflows), expert math (`tf_moe.layers.Experts`),
the choice of this path (`tf_moe.ops.plan`).

Shape letters: G groups, S tokens per group, d model dim, h hidden dim,
E experts, k choices per token, N buffer rows.
"""

from typing import NamedTuple

from keras import ops

from tf_moe.ops import custom_call
from tf_moe._groups import take_rows


class DroplessLayout(NamedTuple):
    """Where each routed choice sits in the expert-sorted row buffer.

    Attributes:
        row: <int32>[G, S, k] row of each choice; `num_rows` (a sentinel
            past the buffer) where the choice is not routed.
        group_sizes: <int32>[E] rows of each expert's segment (its routed
            choices rounded up to `tile`).
        tile_expert: <int32>[num_rows // tile] expert of each tile; E for
            tiles past the last segment (unused rows).
        row_owner: <int32>[num_rows] flat token index g * S + s of each row;
            G * S for padding rows.
        num_rows: N, an int (a scalar tensor when G is not static).
        tile: int.
    """

    row: object
    group_sizes: object
    tile_expert: object
    row_owner: object
    num_rows: object
    tile: int


def dropless_num_rows(num_choices, num_experts, tile):
    """Buffer size N for `num_choices` = G * S * k choices (an int when G is
    static, else a scalar tensor: e.g. TF traces `model.fit` steps with an
    unknown batch size; XLA compiles each concrete one)."""
    rows = num_choices + num_experts * (tile - 1)
    return -(-rows // tile) * tile


def _tile_expert(ends, num_rows, tile):
    """<int32>[N / tile] expert of each tile of rows, from the segment ends
    [E]; E past the last segment."""
    tile_start = ops.arange(num_rows // tile, dtype="int32") * tile
    return ops.sum(ops.cast(tile_start[:, None] >= ends[None, :], "int32"), axis=-1)


def segment_layout(group_sizes, num_rows):
    """The `DroplessLayout` (tile 1) of `num_rows` rows already sorted into
    expert segments of `group_sizes` <int32>[E] from row 0, for the grouped
    matmuls; it maps no tokens (`row` and `row_owner` are None)."""
    group_sizes = ops.cast(group_sizes, "int32")
    return DroplessLayout(
        row=None,
        group_sizes=group_sizes,
        tile_expert=ops.cast(_tile_expert(ops.cumsum(group_sizes), num_rows, 1), "int32"),
        row_owner=None,
        num_rows=num_rows,
        tile=1,
    )


def dropless_layout(routing, tile=1):
    """Builds the `DroplessLayout` of a `Routing` (its `dispatch_mask` decides
    which choices are routed; `position` and `capacity` are not used)."""
    if tile < 1:
        raise ValueError(f"`tile` must be >= 1. Received: tile={tile}")
    g, s, k = routing.expert_index.shape
    if g is None:
        g = ops.shape(routing.expert_index)[0]
    num_experts = routing.num_experts
    num_choices = g * s * k
    num_rows = dropless_num_rows(num_choices, num_experts, tile)
    # Shape: [G * S * k]; E for choices that are not routed.
    expert = ops.reshape(
        ops.where(routing.dispatch_mask, routing.expert_index, num_experts), (-1,)
    )
    onehot = ops.one_hot(expert, num_experts + 1, dtype="int32")  # [n, E + 1]
    counts = ops.sum(onehot, axis=0)[:num_experts]  # [E]
    # Earlier routed choices of the same expert, in flat (g, s, j) order.
    rank = ops.sum((ops.cumsum(onehot, axis=0) - onehot) * onehot, axis=-1)  # [n]
    group_sizes = (counts + (tile - 1)) // tile * tile  # [E]
    ends = ops.cumsum(group_sizes)
    starts = ends - group_sizes
    routed = expert < num_experts
    start_of_choice = ops.take(starts, ops.minimum(expert, num_experts - 1))
    row = ops.where(routed, start_of_choice + rank, num_rows)  # [n]
    tile_expert = _tile_expert(ends, num_rows, tile)  # [N / tile], in [0, E]
    # Owner of each row: scatter token indices (+1, so that 0 means empty)
    # into N + 1 slots; the last slot collects the unrouted choices.
    token = ops.repeat(ops.arange(g * s, dtype="int32"), k)  # [n]
    owner = ops.scatter(
        row[:, None], ops.where(routed, token + 1, 0), (num_rows + 1,)
    )[:num_rows]
    row_owner = ops.where(owner > 0, owner - 1, g * s)
    return DroplessLayout(
        row=ops.reshape(ops.cast(row, "int32"), (-1, s, k)),
        group_sizes=ops.cast(group_sizes, "int32"),
        tile_expert=ops.cast(tile_expert, "int32"),
        row_owner=ops.cast(row_owner, "int32"),
        num_rows=num_rows,
        tile=tile,
    )


def dropless_dispatch(x, layout):
    """x [G, S, d] -> rows [N, d] (0 for padding rows)."""
    d = x.shape[-1]
    tokens = ops.concatenate([ops.reshape(x, (-1, d)), ops.zeros((1, d), x.dtype)], 0)
    return take_rows(tokens, layout.row_owner)


def dropless_combine(out_rows, routing, layout):
    """out_rows [N, d] -> y [G, S, d] = sum_j combine_weight * out_rows[row]."""
    d = out_rows.shape[-1]
    rows = ops.concatenate([out_rows, ops.zeros((1, d), out_rows.dtype)], 0)
    gathered = take_rows(rows, layout.row)  # [G, S, k, d]
    weight = ops.cast(
        ops.where(routing.dispatch_mask, routing.combine_weight, 0.0), rows.dtype
    )
    return ops.einsum("gskd,gsk->gsd", gathered, weight)


def _row_routing(routing, layout):
    """The row layout as a one-expert, one-group `Routing` ([1, G*S, k];
    choice (t, j) goes to slot row[t, j] of a [1, 1, N, d] buffer), so that
    the custom-call dispatch/combine kernels move the rows."""
    k = routing.expert_index.shape[-1]

    def flat(t):
        return ops.reshape(t, (1, -1, k))

    return routing._replace(
        expert_index=ops.zeros_like(flat(routing.expert_index)),
        position=flat(layout.row),
        dispatch_mask=flat(routing.dispatch_mask),
        combine_weight=flat(routing.combine_weight),
        num_experts=1,
        capacity=layout.num_rows,
        slot_token=None,
        slot_weight=None,
    )


def dispatch_rows(x, routing, layout, kernels=False):
    """x [G, S, d] -> rows [N, d] (0 for padding rows).

    Args:
        kernels: move the rows with the custom-call dispatch kernel (needs a
            static N: its adjoint is a gather, where XLA's gather gradient is
            a scatter-add); else a `keras.ops` gather.
    """
    d = x.shape[-1]
    if kernels:
        rows = custom_call.custom_call_dispatch(
            ops.reshape(x, (1, -1, d)), _row_routing(routing, layout)
        )
        return ops.reshape(rows, (-1, d))
    return dropless_dispatch(x, layout)


def combine_rows(out_rows, routing, layout, kernels=False):
    """out_rows [N, d] -> y [G, S, d]; `kernels` as for `dispatch_rows`."""
    if kernels:
        s, d = routing.expert_index.shape[1], out_rows.shape[-1]
        y = custom_call.custom_call_combine(
            ops.reshape(out_rows, (1, 1, -1, d)), _row_routing(routing, layout)
        )
        return ops.reshape(y, (-1, s, d))
    return dropless_combine(out_rows, routing, layout)
