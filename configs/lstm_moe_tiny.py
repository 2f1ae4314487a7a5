"""Tiny LSTM-MoE on the built-in English corpus: CPU, a few minutes.

Shazeer 2017's architecture (two LSTMs around a noisy top-k MoE, residual
connections, sigmoid after the MoE) at toy width.
"""

from ml_collections import config_dict


def get_config():
    config = config_dict.ConfigDict()
    config.seed = 0
    config.data = config_dict.ConfigDict(dict(
        corpus="tf_moe_lm_en",     # or "lm1b" when a data_dir holds it
        data_dir=config_dict.placeholder(str),  # default: ~/tensorflow_datasets
        source="tfds",             # or "token_cache": read token_cache_dir (no TF)
        token_cache_dir=config_dict.placeholder(str),
        vocab_size=8000,
        sequence_length=64,
        eval_batches=50,           # validation/test batches for perplexity (0: all)
        eval_batch_size=config_dict.placeholder(int),  # sequences per evaluation
                                   # batch (None: train.batch_size)
    ))
    config.model = config_dict.ConfigDict(dict(
        dim=128,
        dropout=0.1,
        residual=True,
        moe_sigmoid=True,
        hierarchical=False,
        num_experts=16,
        k=4,
        expert_hidden_dim=256,
        num_groups=4, experts_per_group=4, primary_k=2, secondary_k=2,
        capacity_factor=1.25,
        eval_capacity_factor=None,  # dropless at evaluation: no token's output
                                    # depends on later tokens or other sequences
        group_size=1024,
        importance_loss_weight=0.1,
        load_loss_weight=0.1,
        dispatch="auto",
        dense_ffn_hidden_dim=config_dict.placeholder(int),  # int: a dense FFN
                                   # instead of the MoE (the dense baseline)
    ))
    config.train = config_dict.ConfigDict(dict(
        batch_size=32,
        steps=400,
        checkpoint_every=100,
        keep_checkpoints=3,
        async_checkpoints=False,   # Orbax saves in the background
        learning_rate=2e-3,
        warmup_steps=100,
        log_every=20,
        jit_compile=config_dict.placeholder(bool),  # None: XLA (Keras's default)
        dtype_policy="float32",    # or mixed_bfloat16 / mixed_float16 (GPUs, TPUs)
    ))
    return config
