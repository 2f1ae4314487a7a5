"""Schema and defaults of the Transformer-MoE recipes (trainers/transformer_moe.py).

`get_config()` returns every field the trainer reads, documented once here,
with the values of the tiny translation recipe (CPU, a few minutes; see
configs/transformer_moe_tiny_translate.py). The other recipes start from it
and override what differs; the paper-sized ones (switch_base, gshard, st_moe)
also apply `paper_scale`, the data, training and evaluation settings they
share.
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
        source="tfds",             # "lm" also "token_cache": read token_cache_dir (no TF)
        token_cache_dir=config_dict.placeholder(str),
        vocab_size=8000,
        sequence_length=64,        # tokens per side (source and target), padded;
                                   # for "lm", tokens per example
        source_language="en",      # translate only
        target_language="de",      # translate only
        eval_batches=20,           # validation/test batches for perplexity (0: all)
        eval_batch_size=config_dict.placeholder(int),  # sequences per evaluation
                                   # batch (None: train.batch_size)
    ))
    config.model = config_dict.ConfigDict(dict(
        dim=128,
        num_heads=4,
        num_layers=2,              # blocks in the encoder and in the decoder ("lm": decoder)
        ffn_hidden_dim=512,        # dense FFNs
        ffn_activation="relu",     # or "geglu"
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=2,               # MoE in blocks moe_every-1, 2*moe_every-1, ...
        num_experts=8,
        k=1,                       # experts per token: 1 Switch, 2 GShard / ST-MoE
        second_expert_policy="all",  # k = 2: "all" keeps every second choice,
                                   # "random" keeps it with probability 2 * g2 / (g1 + g2)
        normalize_weights=False,   # renormalize the k gates to sum to 1
        batch_prioritized_routing=False,
        balance_loss_weight=1e-2,
        z_loss_weight=0.0,         # router z-loss (ST-MoE)
        jitter_noise=0.0,          # multiplicative router input jitter (Switch)
        expert_hidden_dim=512,
        expert_activation="relu",  # or "geglu"
        expert_dropout=0.1,
        capacity_factor=1.25,      # expert capacity C = capacity_factor * S * k / E
        eval_capacity_factor=None,  # dropless at evaluation and decoding: a
                                   # capacity would let later tokens and other
                                   # sequences change a token's output (the
                                   # papers evaluated with 2.0)
        group_size=1024,           # tokens routed together (S)
        dispatch="auto",
    ))
    config.train = config_dict.ConfigDict(dict(
        batch_size=32,             # sequences of sequence_length tokens per step
        steps=1000,
        checkpoint_every=200,
        keep_checkpoints=3,
        async_checkpoints=False,   # Orbax saves in the background
        learning_rate=1e-3,
        warmup_steps=200,
        log_every=20,
        jit_compile=config_dict.placeholder(bool),  # None: XLA (Keras's default)
        dtype_policy="float32",    # or mixed_bfloat16 / mixed_float16 (GPUs, TPUs)
    ))
    config.eval = config_dict.ConfigDict(dict(
        # BLEU, task="translate" only.
        beam_size=4,
        length_penalty_alpha=0.6,  # Wu et al. 2016; 0 ranks beams by log-probability
        bleu_examples=500,         # sentences decoded per split for BLEU (0: all)
        decode_batch_size=64,
    ))
    return config


def paper_scale(config):
    """Sets the data, training and evaluation sizes of the paper-sized recipes."""
    config.data.update(vocab_size=32000, sequence_length=128, eval_batches=0)
    config.train.update(
        batch_size=256, steps=100_000, checkpoint_every=1000,
        warmup_steps=10_000, log_every=100,
    )
    config.eval.bleu_examples = 0
    return config
