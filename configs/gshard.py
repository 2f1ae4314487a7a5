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
        num_layers=6,              # blocks in the encoder and in the decoder
        ffn_hidden_dim=8192,       # dense FFNs
        ffn_activation="relu",
        dropout=0.1,
        position="learned",        # or "sinusoidal"
        moe_every=2,               # MoE in blocks 1, 3, ... (every other FFN)
        num_experts=128,
        k=2,
        second_expert_policy="random",
        normalize_weights=True,
        batch_prioritized_routing=False,
        balance_loss_weight=1e-2,
        z_loss_weight=0.0,
        jitter_noise=0.0,
        expert_hidden_dim=8192,
        expert_activation="relu",
        expert_dropout=0.1,
        capacity_factor=1.0,       # C = 2N/E with k = 2
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
