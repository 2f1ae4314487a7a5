"""Tiny decoder-only Transformer-MoE language model on the built-in English
corpus: CPU, a few minutes.

4 pre-LN causal blocks of width 128; blocks 1 and 3 have a top-2 MoE of 8
experts (GShard-style: random second expert, renormalized weights), blocks 0
and 2 a dense FFN. For Switch routing: `--config.model.k=1
--config.model.second_expert_policy=all --config.model.normalize_weights=False`.
"""

from configs import transformer_moe_base


def get_config():
    config = transformer_moe_base.get_config()
    config.task = "lm"
    config.data.eval_batches = 50
    config.model.update(
        num_layers=4, k=2, second_expert_policy="random", normalize_weights=True,
    )
    config.train.update(steps=600, checkpoint_every=100, warmup_steps=100)
    return config
