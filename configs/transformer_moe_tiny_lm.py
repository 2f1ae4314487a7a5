"""Tiny decoder-only Transformer-MoE language model on the built-in English
corpus: CPU, a few minutes.

4 pre-LN causal blocks of width 128; blocks 1 and 3 have a top-2 MoE of 8
experts (GShard-style: random second expert, renormalized weights), blocks 0
and 2 a dense FFN. For Switch routing: `--config.model.k=1
--config.model.second_expert_policy=all --config.model.normalize_weights=False`.
"""

from ml_collections import config_dict


def get_config():
    config = config_dict.ConfigDict()
    config.seed = 0
    config.task = "lm"             # "lm" (decoder-only) or "translate" (encoder-decoder)
    config.data = config_dict.ConfigDict(dict(
        corpus=config_dict.placeholder(str),  # None: the built-in corpus of the task
                                   # (tf_moe_translate_en_de / tf_moe_lm_en); or a tfds
                                   # name, e.g. "wmt14_translate/de-en", "lm1b"
        data_dir=config_dict.placeholder(str),  # default: ~/tensorflow_datasets
        vocab_size=8000,
        sequence_length=64,        # tokens per example
        source_language="en",      # translate only
        target_language="de",      # translate only
        eval_batches=50,           # validation/test batches for perplexity (0: all)
    ))
    config.model = config_dict.ConfigDict(dict(
        dim=128,
        num_heads=4,
        num_layers=4,              # decoder blocks
        ffn_hidden_dim=512,        # dense FFNs
        ffn_activation="relu",
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=2,               # MoE in blocks 1, 3, ... (every other FFN)
        num_experts=8,
        k=2,
        second_expert_policy="random",
        normalize_weights=True,
        batch_prioritized_routing=False,
        balance_loss_weight=1e-2,
        z_loss_weight=0.0,
        jitter_noise=0.0,
        expert_hidden_dim=512,
        expert_activation="relu",
        expert_dropout=0.1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=1024,
        dispatch="auto",
    ))
    config.train = config_dict.ConfigDict(dict(
        batch_size=32,
        steps=600,
        checkpoint_every=100,
        keep_checkpoints=3,
        learning_rate=1e-3,
        warmup_steps=100,
        log_every=20,
        jit_compile=config_dict.placeholder(bool),  # None: XLA except TF on CPU
    ))
    config.eval = config_dict.ConfigDict(dict(
        # Used by task="translate" only (BLEU); kept so that --config.task=translate works.
        beam_size=4,
        length_penalty_alpha=0.6,
        bleu_examples=500,
        decode_batch_size=64,
    ))
    return config
