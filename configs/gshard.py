"""GShard (Lepikhin et al. 2020): a Transformer encoder-decoder for
translation whose every other FFN is a top-2 MoE; here MoE(128E, 12L).

From the paper: top-2 gating with the "random" second expert (dispatched with
probability 2 * g2 / (g1 + g2)) and the two gates renormalized to sum to 1;
expert capacity 2N/E per group of N tokens (capacity_factor 1.0 with k = 2
in our C = capacity_factor * S * k / E); auxiliary balance loss
mean(c_e / S) * mean(m_e) over experts (our balance loss, weight 1e-2); MoE in
every other layer; d_model 1024, FFN (and expert) hidden 8192, 16 heads;
model sizes written MoE(E experts, L layers), with L counting encoder plus
decoder layers: 12L is 6 + 6, and the paper's largest is MoE(2048E, 36L),
about 600B parameters, trained on 100 languages to English. MoE(128E, 12L)
is this config (about 13B parameters by our count: 6 MoE layers of 128
experts x 2 x 1024 x 8192). Positions here are learned absolute embeddings.

Not run here (paper-sized): the tests do a 2-step smoke run with tiny
overrides.
"""

from configs import transformer_moe_base


def get_config():
    config = transformer_moe_base.paper_scale(transformer_moe_base.get_config())
    config.model.update(
        dim=1024, num_heads=16, num_layers=6, ffn_hidden_dim=8192,
        num_experts=128, k=2, second_expert_policy="random", normalize_weights=True,
        expert_hidden_dim=8192,
        capacity_factor=1.0,       # C = 2N/E with k = 2
    )
    return config
