"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
Choice Routing").

Router scores are a softmax over experts; each expert takes the C tokens of its
group with the highest score for it, so every expert is exactly full and a
token may be processed by 0 to E experts. The `Routing` is slot-major
(`Routing.from_slots`: the slot -> token index the rule produces), so
dispatch moves E * C rows per group; its token-major view has k = E (choice j
of a token is expert j).

Shape letters: G groups, S tokens per group, E experts, C capacity.
"""

import keras
from keras import ops

from tf_moe._groups import top_k
from tf_moe.routing.router import Router, Routing


def expert_choice_routing(router_probs, capacity, token_mask):
    """Each expert keeps its top-`capacity` tokens by router probability.

    Args:
        router_probs: <float32>[G, S, E].
        capacity: int in [1, S], tokens per expert (C).
        token_mask: <bool>[G, S]; padding tokens are never chosen.

    Returns:
        A slot-major `Routing` (`Routing.from_slots`): slot c of expert e
        holds its c-th best token, with that token's probability for e as
        combine weight; slots left empty (fewer than C real tokens) hold S.
    """
    group_size = router_probs.shape[1]
    # Padding scores -1, below any probability, and is masked out below.
    scores = ops.where(token_mask[..., None], router_probs, -1.0)  # [G, S, E]
    # Shape: [G, E, C]
    top_scores, top_token = top_k(ops.transpose(scores, (0, 2, 1)), capacity)
    filled = top_scores >= 0.0
    return Routing.from_slots(
        slot_token=ops.where(filled, ops.cast(top_token, "int32"), group_size),
        slot_weight=ops.where(filled, top_scores, 0.0),
        token_mask=token_mask,
        router_probs=router_probs,
    )


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertChoiceRouter(Router):
    """Expert-choice router: each expert picks its top-C tokens per group.

    The `MoE` layer's capacity factor c sets C = ceil(c * S / E), i.e. on
    average c experts per token. Needs no balance loss (every expert is full
    by construction); the z-loss applies as for every router.

    Args:
        num_experts: see `Router`.
        **kwargs: `Router` arguments (jitter_noise, z_loss_weight,
            kernel_initializer (default truncated normal, fan-in scale 0.1),
            seed, name).

    Example:
    >>> router = ExpertChoiceRouter(num_experts=4)
    >>> routing = router.route(keras.random.normal((1, 8, 16)), capacity=2)
    >>> keras.ops.convert_to_numpy(routing.dispatch_mask).sum()
    np.int64(8)
    """

    choices_per_token = 1
    token_choice = False  # the capacity C is the routing rule

    def __init__(self, num_experts=None, kernel_initializer=None, **kwargs):
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.VarianceScaling(
                scale=0.1, mode="fan_in", distribution="truncated_normal"
            )
        super().__init__(
            num_experts=num_experts, kernel_initializer=kernel_initializer, **kwargs
        )

    def experts_per_token(self, capacity_factor):
        """c experts per token on average; all E with no capacity limit."""
        if capacity_factor is None:
            return self.num_experts
        return min(float(capacity_factor), self.num_experts)

    def _route(self, x, logits, capacity, token_mask, training):
        router_probs = ops.softmax(logits, axis=-1)  # [G, S, E]
        return expert_choice_routing(router_probs, capacity, token_mask)
