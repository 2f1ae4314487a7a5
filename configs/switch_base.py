"""Switch-Base (Fedus et al. 2021, "Switch Transformers"): a T5-Base-sized
encoder-decoder whose every other FFN is a top-1 (Switch) MoE; 128 experts.

Architecture numbers are those of the released Switch-Base checkpoints
(google/switch-base-128 config: d_model 768, d_ff 3072, 12 heads of 64,
12 encoder + 12 decoder layers, sparse every 2nd layer, ReLU, dropout 0.1,
router jitter 0.01, 32k SentencePiece vocabulary). From the paper: top-1
routing, balance loss alpha = 1e-2, capacity factor 1.25 in training (1.0 and
1.25 compared in its Table 1) and 2.0 at evaluation, router in float32,
"smaller parameter initialization" (scale 0.1, our TopKRouter's default), expert
dropout 0.4 when fine-tuning (0.1 here, as in pre-training). The paper reports
Switch-Base (128 experts) at about 7B parameters with T5-Base's FLOPs per token
and pre-trains it on C4 with span corruption; this config trains it on the
built-in translation corpus (or `--config.task=lm`) instead. Positions here are
learned absolute embeddings, not T5's relative buckets.

Not run here (paper-sized): the tests do a 2-step smoke run with tiny
overrides. Needs accelerators: `--tpu=NAME` (TF) or JAX on a TPU VM / GPUs.
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
        dim=768,
        num_heads=12,
        num_layers=12,             # blocks in the encoder and in the decoder
        ffn_hidden_dim=3072,       # dense FFNs
        ffn_activation="relu",
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=2,               # MoE in blocks 1, 3, ... (every other FFN)
        num_experts=128,
        k=1,
        second_expert_policy="all",
        normalize_weights=False,
        batch_prioritized_routing=False,
        balance_loss_weight=1e-2,
        z_loss_weight=0.0,
        jitter_noise=0.01,
        expert_hidden_dim=3072,
        expert_activation="relu",
        expert_dropout=0.1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=4096,
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
