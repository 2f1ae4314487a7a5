"""Moving tokens to experts and back: the plan of a layer call (`plan`), the
keras.ops paths (`dispatch`: einsum, gather), the custom calls
(`custom_call`, `dropless`, `grouped_matmul`) and their loader (`library`)."""

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
)
from tf_moe.ops.plan import DispatchPlan, portable, resolve_plan
