"""Shazeer et al. 2017's 1-Billion-Word language models (section 5.1, appendix
C.1), for reference and for runs with tfds `lm1b` prepared in a data_dir.

Paper: embedding, two 512-unit LSTMs, a MoE between them whose experts are
1024-hidden ReLU FFNs with 512 outputs (1M parameters each), sigmoid on the MoE
output, residual connections, dropout, k = 4; flat MoE-4/32/256 and
hierarchical MoE-256-h/1024-h/4096-h (16 groups in the primary gate for
1024-h, k1 = k2 = 2). Batch about 300k words, Adam, 10 epochs, word-level
vocabulary of 793,471 (here a SentencePiece vocabulary of 32k). Not run on the
project's machines.

    python -m trainers.lstm_moe --config=configs/lstm_moe_1b_word.py:4096h \
        --config.data.data_dir=/path/with/lm1b --workdir=...
"""

from configs import lstm_moe_tiny

FLAT = {"4": 4, "32": 32, "256": 256}
HIERARCHICAL = {"256h": (16, 16), "1024h": (32, 32), "4096h": (64, 64)}


def get_config(size="32"):
    if size not in FLAT and size not in HIERARCHICAL:
        raise ValueError(
            f"lstm_moe_1b_word takes a size in {sorted(FLAT) + sorted(HIERARCHICAL)}. "
            f"Received: size={size!r}"
        )
    config = lstm_moe_tiny.get_config()
    config.data.corpus = "lm1b"
    config.data.vocab_size = 32_000
    config.data.sequence_length = 20
    config.data.eval_batches = 0
    m = config.model
    m.dim = 512
    m.expert_hidden_dim = 1024
    m.dropout = 0.1
    m.k = 4
    if size in FLAT:
        m.num_experts = FLAT[size]
    else:
        m.hierarchical = True
        m.num_groups, m.experts_per_group = HIERARCHICAL[size]
        m.primary_k, m.secondary_k = 2, 2
    config.train.batch_size = 1024
    config.train.steps = 100_000
    config.train.checkpoint_every = 2000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 1000
    return config
