"""Tiny Transformer-MoE translation model (English -> German) on the built-in
corpus: CPU, a few minutes.

An encoder-decoder with 2 + 2 pre-LN blocks of width 128; every other FFN is
a Switch MoE (k=1) of 8 experts. Override the router with e.g.
`--config.model.k=2 --config.model.second_expert_policy=random
--config.model.normalize_weights=True` (GShard).
"""

from ml_collections import config_dict


def get_config():
    config = config_dict.ConfigDict()
    config.seed = 0
    config.task = "translate"      # "lm" (decoder-only) or "translate" (encoder-decoder)
    config.data = config_dict.ConfigDict(dict(
        corpus=config_dict.placeholder(str),  # None: the built-in corpus of the task
                                   # (tf_moe_translate_en_de / tf_moe_lm_en); or a tfds
                                   # name, e.g. "wmt14_translate/de-en", "lm1b"
        data_dir=config_dict.placeholder(str),  # default: ~/tensorflow_datasets
        vocab_size=8000,
        sequence_length=64,        # tokens per side (source and target), padded
        source_language="en",
        target_language="de",
        eval_batches=20,           # validation/test batches for perplexity (0: all)
    ))
    config.model = config_dict.ConfigDict(dict(
        dim=128,
        num_heads=4,
        num_layers=2,              # blocks in the encoder and in the decoder
        ffn_hidden_dim=512,        # dense FFNs
        ffn_activation="relu",
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=2,               # MoE in blocks 1, 3, ... (every other FFN)
        num_experts=8,
        k=1,
        second_expert_policy="all",
        normalize_weights=False,
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
        steps=1000,
        checkpoint_every=200,
        keep_checkpoints=3,
        learning_rate=1e-3,
        warmup_steps=200,
        log_every=20,
        jit_compile=config_dict.placeholder(bool),  # None: XLA except TF on CPU
    ))
    config.eval = config_dict.ConfigDict(dict(
        beam_size=4,
        length_penalty_alpha=0.6,  # Wu et al. 2016; 0 ranks beams by log-probability
        bleu_examples=500,         # sentences decoded per split for BLEU (0: all)
        decode_batch_size=64,
    ))
    return config
