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
        vocab_size=32000,
        sequence_length=128,       # tokens per side (source and target), padded
        source_language="en",
        target_language="de",
        eval_batches=0,            # validation/test batches for perplexity (0: all)
    ))
    config.model = config_dict.ConfigDict(dict(
        dim=1024,
        num_heads=16,
        num_layers=24,             # blocks in the encoder and in the decoder
        ffn_hidden_dim=2816,       # dense FFNs
        ffn_activation="geglu",
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=4,               # MoE in blocks 3, 7, ... (every fourth FFN)
        num_experts=32,
        k=2,
        second_expert_policy="all",
        normalize_weights=False,
        batch_prioritized_routing=False,
        balance_loss_weight=1e-2,
        z_loss_weight=1e-3,
        jitter_noise=0.0,
        expert_hidden_dim=2816,
        expert_activation="geglu",
        expert_dropout=0.1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=1024,
        dispatch="auto",
    ))
    config.train = config_dict.ConfigDict(dict(
        batch_size=256,            # sequences of sequence_length tokens per step
        steps=100_000,
        checkpoint_every=1000,
        keep_checkpoints=3,
        learning_rate=1e-3,
        warmup_steps=10_000,
        log_every=100,
        jit_compile=True,
    ))
    config.eval = config_dict.ConfigDict(dict(
        beam_size=4,
        length_penalty_alpha=0.6,  # Wu et al. 2016; 0 ranks beams by log-probability
        bleu_examples=0,           # sentences decoded per split for BLEU (0: all)
        decode_batch_size=64,
    ))
    return config
