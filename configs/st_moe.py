"""ST-MoE (Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable
Sparse Expert Models"): top-2 routing with the router z-loss and gated-GELU
(GEGLU) experts, at ST-MoE-L size.

From the paper: router z-loss (1/B) sum_x (log sum_j exp(x_j))^2 with weight
1e-3 next to the balance loss with weight 1e-2; top-2 routing (every second
choice kept, weights not renormalized); capacity factor 1.25 in training and
2.0 at evaluation; GEGLU expert and dense FFNs (T5.1.1); a sparse layer every
fourth layer. ST-MoE-L: d_model 1024, FFN hidden 2816, 16 heads, 32 experts,
about 4.1B parameters, which our count matches with 24 encoder + 24 decoder
layers (12 sparse layers of 32 GEGLU experts, 3 x 1024 x 2816 each, about
3.3B, plus the dense 0.8B). ST-MoE-32B is d_model 5120, FFN 20480, 64 heads,
64 experts, 269B. Not modelled: the extra dense FFN the paper puts right
before each sparse one, and T5's relative position buckets (positions here
are learned absolute embeddings). `--config.model.moe_every=2` gives the
every-other-layer placement of the Switch and GShard configs. Pre-training in
the paper is span corruption on a C4 mixture; here the built-in translation
corpus (or `--config.task=lm`).

Not run here (paper-sized): the tests do a 2-step smoke run with tiny
overrides.
"""

from configs import transformer_moe_base


def get_config():
    config = transformer_moe_base.paper_scale(transformer_moe_base.get_config())
    config.model.update(
        dim=1024, num_heads=16, num_layers=24, ffn_hidden_dim=2816,
        ffn_activation="geglu", moe_every=4,  # MoE in blocks 3, 7, ...
        num_experts=32, k=2, second_expert_policy="all", normalize_weights=False,
        z_loss_weight=1e-3, expert_hidden_dim=2816, expert_activation="geglu",
        capacity_factor=1.25,
    )
    return config
