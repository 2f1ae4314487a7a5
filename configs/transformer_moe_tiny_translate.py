"""Tiny Transformer-MoE translation model (English -> German) on the built-in
corpus: CPU, a few minutes.

An encoder-decoder with 2 + 2 pre-LN blocks of width 128; every other FFN is
a Switch MoE (k=1) of 8 experts. Override the router with e.g.
`--config.model.k=2 --config.model.second_expert_policy=random
--config.model.normalize_weights=True` (GShard).
"""

from configs import transformer_moe_base


def get_config():
    return transformer_moe_base.get_config()
