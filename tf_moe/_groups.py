"""Row gathers and scatter-adds, batched over routing groups.

Dispatch moves rows within a group: slot (e, c) of group g takes token s of
group g, never of another group. Written with the group as a batch dimension
(JAX: `vmap` of a take / `.at[].add`), XLA's SPMD partitioner keeps each
group's gather on the device that holds the group, so a mesh that shards the
groups moves no token rows for them (a gather from the flattened [G * S]
rows is not partitioned: XLA all-gathers its operand). TensorFlow never
partitions a program this way, and its own batched-gather gradient aborts XLA
next to a top-k router (see `take_rows`), so there the rows are flattened
with per-group offsets.

Hand-written because `keras.ops` has no batched take or scatter-add.

`top_k` is here for the same reason: XLA's SPMD partitioner all-gathers the
operand of its TopK op (jaxlib 0.10, CPU), but partitions a sort over its
other axes, so on JAX under a `keras.distribution` the routers' top-k is a
stable sort; elsewhere it is XLA's TopK, the cheaper op on one device.

Owns: `take_rows`, `take_per_group`, `scatter_add_per_group`, `top_k`. Does
not own: what is gathered or chosen (dispatch paths, routing).

Shape letters: G groups, R rows per group, n indices per group.
"""

import keras
from keras import ops


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


def _flat_index(index, rows_per_group):
    """index [G, n] within groups -> [G, n] into the flattened [G * R] rows."""
    group = ops.arange(ops.shape(index)[0], dtype="int32")[:, None]  # [G, 1]
    return index + group * rows_per_group


def take_per_group(rows, index):
    """rows [G, R, d], index <int32>[G, n] in [0, R) -> [G, n, d] with
    out[g, i] = rows[g, index[g, i]]."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.vmap(lambda r, i: r[i])(rows, index)
    r, d = rows.shape[1], rows.shape[-1]
    flat = take_rows(ops.reshape(rows, (-1, d)), _flat_index(index, r))
    return ops.reshape(flat, (-1, index.shape[1], d))


def scatter_add_per_group(values, index, num_rows):
    """values [G, n, ...], index <int32>[G, n] in [0, num_rows) ->
    [G, num_rows, ...] with out[g, r] = sum of values[g, i] where
    index[g, i] = r (0 where none)."""
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def one(v, i):
            return jnp.zeros((num_rows,) + v.shape[1:], v.dtype).at[i].add(v)

        return jax.vmap(one)(values, index)
    groups = ops.shape(index)[0]
    trailing = tuple(values.shape[2:])
    flat = ops.reshape(values, (-1,) + trailing)
    out = ops.segment_sum(
        flat, ops.reshape(_flat_index(index, num_rows), (-1,)), groups * num_rows
    )
    return ops.reshape(out, (-1, num_rows) + trailing)


def top_k(x, k):
    """(values, indices) of the k largest entries along the last axis of x,
    descending, the lower index first among ties (as `keras.ops.top_k`)."""
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        return ops.top_k(x, k)
    import jax

    index = jax.lax.broadcasted_iota("int32", x.shape, x.ndim - 1)
    negated, index = jax.lax.sort((-x, index), dimension=x.ndim - 1, num_keys=1)
    return -negated[..., :k], index[..., :k]
