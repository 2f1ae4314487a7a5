"""The paper's flat MoE family on the built-in English corpus: E experts,
k = 4 active per token, so compute per token stays fixed as E grows.

Shazeer et al. 2017, section 5.1 / table 7: MoE-4, MoE-32 and MoE-256 (flat),
every expert a 1024-hidden ReLU FFN on a 512-wide LSTM. Here sized for a
~9M-word corpus and CPUs/one GPU: d = 256, expert hidden 512.

    python -m trainers.lstm_moe --config=configs/lstm_moe_flat.py:32 --workdir=...

The argument after ':' is E, one of 4, 8, 16, 32, 64, 128, 256.
"""

from configs import lstm_moe_tiny

NUM_EXPERTS = (4, 8, 16, 32, 64, 128, 256)


def get_config(num_experts="32"):
    num_experts = int(num_experts)
    if num_experts not in NUM_EXPERTS:
        raise ValueError(
            f"lstm_moe_flat takes num_experts in {NUM_EXPERTS}. "
            f"Received: num_experts={num_experts}"
        )
    config = lstm_moe_tiny.get_config()
    config.data.sequence_length = 64
    config.model.dim = 256
    config.model.num_experts = num_experts
    config.model.k = 4
    config.model.expert_hidden_dim = 512
    config.model.dropout = 0.1
    config.train.batch_size = 64
    config.train.steps = 20_000
    config.train.checkpoint_every = 1000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 1000
    return config
