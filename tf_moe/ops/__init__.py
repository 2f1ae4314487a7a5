"""Token dispatch/combine: the keras.ops paths (einsum, gather) and the
choice among them and the custom calls (`custom_call`, `dropless`,
`grouped_matmul` are submodules)."""

from tf_moe.ops.dispatch import (
    DISPATCH_METHODS,
    DISPATCHERS,
    einsum_combine,
    einsum_dispatch,
    gather_combine,
    gather_dispatch,
    slot_mask,
    slot_owner,
    slot_weight,
    resolve_dispatch,
)
