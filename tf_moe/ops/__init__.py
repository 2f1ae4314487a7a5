"""Token dispatch/combine implementations (pure keras.ops paths)."""

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
